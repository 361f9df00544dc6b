"""Everything that touches files, bottom to top.

- ``files``: atomic writes and output-path checks;
- ``checks``: bounds on values read from files and options (JSON, input shapes, normalization);
- ``reading``: original checkpoints (state dicts, pickles only when trusted) and strict weight loading;
- ``archspec``: building architectures from specs under the trust model;
- ``archsig`` / ``archinfer``: finding the torchvision/timm architecture of a bare state dict;
- ``records`` and ``dataconfig``: what is known about a model's inputs;
- ``format``: the ``.lrc.safetensors`` format (manifest, save, load);
- ``opening``: open any model file.
"""
