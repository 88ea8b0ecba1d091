"""Building blocks of the models: linear/conv/norm layers with logical axes and scanned, rematerialised stacks
(layers), rotary tables (rope), torch-exact resizes (resize), the static-shape image/text merge (merge), LoRA
adapters (lora) and parameter selection by path (params). Above ``parallel`` and ``kernels``.
"""
