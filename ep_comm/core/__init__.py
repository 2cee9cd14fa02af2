"""Definitions shared by every layer: constants that host and device code agree on
(``constants``), the layout of communication buffers (``regions``), the FP8 format (``fp8``),
token -> rank routing (``routing``) and argument checks (``checks``). Nothing here launches a
kernel or talks to another rank."""
