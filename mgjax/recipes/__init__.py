"""The released models and their training recipes as data: MGM's releases (mgm_releases), InternVL2's releases
and fine-tuning recipes (internvl_releases) and Mini-InternVL's adaptation modes (adapt). Above ``models``.
"""
