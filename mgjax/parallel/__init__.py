"""Where arrays live: logical axis names and the rules that map them onto the mesh (sharding), meshes and
placement (mesh), TPU slices by name, deviceless (topology), and multi-process start-up (distributed). The
bottom layer: it imports nothing else of mgjax.
"""
