"""Which channels are redundant: one module per criterion.

- :mod:`.exact`: identical, positively proportional and constant channels (lossless);
- :mod:`.paper`: the paper's rule, the alpha fraction of closest channels merged (lossy);
- :mod:`.reconstruct`: channels the others predict by least squares, removed with compensation (lossy).

They share :mod:`.classes` (channel classes and their sources) and :mod:`.blocks` (channel counts
in the runtime's block, what a channel saves). Which channels are coupled is
:mod:`redonnx.channels.coupling`; how each op is cut is :mod:`redonnx.channels.cutting`.
"""
