"""Fingerprint a training loop: feed it the lab's micro-batches, observe each optimizer step, and name
the accumulation it implements from the weight each micro-batch's loss got in the gradient.

    probes     the runs that make modes show: uneven micro-batches, short windows and epochs, tokens,
               a warmup schedule, a clip that binds (probes.py)
    loops      the loop under test: the lab's own strategies, your function, or a framework (loops.py)
    observe    hooks on the model's forward and the optimizer's step: which micro-batches, which
               gradient, which learning rate (observe.py)
    weights    g = sum_i w_i grad L_i(theta) solved in float64 by least squares (weights.py)
    naming     the weights, windows and learning rates named with the lab's own mode spellings (naming.py)
    session    one loop over every probe -> fingerprint rows (session.py)

The loop is the other side of the glass: the lab only feeds and observes it.
"""
