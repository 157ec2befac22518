"""Dataset readers behind :mod:`utune.train.data`: one module per family, a registry, the transforms.

Import from :mod:`utune.train.data`; the layouts each reader expects are documented there.
"""
