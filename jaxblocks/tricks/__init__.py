"""Weight transforms applied to trained models, one module per technique.

* :mod:`~jaxblocks.tricks.precompute_first_layer` — tabulate layer 0 per vocabulary token.
* :mod:`~jaxblocks.tricks.skipless` — remove W_Q and W_P from skipless, norm-free models.
* :mod:`~jaxblocks.tricks.slim_attention` — K-only decoding cache for MHA (V = K·W_K⁻¹W_V).

Each module has ``convert(params, cfg) -> (new_params, new_cfg)``; the converted model runs
through the ordinary ``model.apply`` / ``apply_cached`` / ``generate``.
"""
