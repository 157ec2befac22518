"""Dataset readers behind :mod:`utune.data`: one module per family, a registry, the transforms.

Import from :mod:`utune.data`; the layouts each reader expects are documented there.
"""
