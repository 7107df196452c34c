"""Which channels are coupled (the channel graph and each op's rule) and how each op is cut."""
