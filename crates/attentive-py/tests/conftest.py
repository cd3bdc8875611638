import attentive

# One kernel thread, so that the GIL test can see two Python threads overlap on two cores.
assert attentive.set_num_threads(1)
