"""Data: the global batch of every step, this rank's slice of it, and the datasets it is drawn from.

- batching.py: which samples step k's global batch holds, and which of them this rank holds (pure arithmetic);
- source.py: what a dataset must offer (read a batch by index); formats.py: the formats by name (the one list);
  one module per format: builtin.py (synthetic, digits), arrays.py (x.npy/y.npy, memory-mapped), imagefolder.py
  (class folders of images, decoded by Pillow), tokens.py (token sequences for language models, memory-mapped);
  disk.py: what the on-disk formats share; users.py: a data
  factory's tensors or map-style dataset (``data.name: package.module:function``); dataset.py: a config's
  dataset, opened through the table; export.py: ``disttrain data export`` (text.py: text files
  as byte-level tokens);
- augment.py: per-sample augmentation from the samples' keys;
- loader.py: this rank's micro-batches of every step, from any source, read in this process or by loader
  workers.
"""
