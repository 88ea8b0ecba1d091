"""The networks, with HF-shaped parameter names and key layouts: decoder LLMs (decoder, moe), the vision towers
(clip, convnext, internvit), MGM (mgm, mining, mgm_towers) and InternVL (internvl); ``registry`` maps an HF
``model_type`` to its class. Above ``nn`` and ``convert``.
"""
