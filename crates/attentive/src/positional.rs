//! Positional schemes that enter attention as score biases.

/// ALiBi slopes for `n` heads (Press et al.): for `n` a power of two, $m_h = 2^{-8h/n}$ for
/// $h = 1..n$; otherwise, with $c = 2^{\lfloor\log_2 n\rfloor}$, the slopes for `c` heads followed by
/// every other slope for `2c` heads, `n − c` of them.
///
/// ```
/// let s = attentive::positional::alibi_slopes(6);
/// let neg_log2: Vec<f32> = s.iter().map(|m| -m.log2()).collect();
/// assert_eq!(neg_log2, vec![2.0, 4.0, 6.0, 8.0, 1.0, 3.0]);
/// ```
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    fn pow2(n: usize) -> Vec<f32> {
        (1..=n)
            .map(|h| 2f64.powf(-8.0 * h as f64 / n as f64) as f32)
            .collect()
    }
    if n == 0 {
        return Vec::new();
    }
    let c = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let mut s = pow2(c);
    if c < n {
        s.extend(pow2(2 * c).into_iter().step_by(2).take(n - c));
    }
    s
}
