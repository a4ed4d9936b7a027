"""The pitch methods' names, in a module without torch: the ingress (which validates f0Method)
and the command line's parser read them without loading the models' code."""

CREPE_METHODS = ("crepe", "crepe-tiny")
# Methods without a network: no weights, no device, nothing to batch; harvest is slow (~0.3 CPU s
# and ~7 MB per audio second, whole), and both are deterministic. Each needs its library.
HOST_METHOD_MODULES = {"pm": "parselmouth", "harvest": "pyworld"}
HOST_METHODS = tuple(HOST_METHOD_MODULES)
PITCH_METHODS = (*CREPE_METHODS, "rmvpe", *HOST_METHODS)
