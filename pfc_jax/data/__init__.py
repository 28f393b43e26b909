"""Data sources and batching.

A *source* is random access: ``len(source)`` examples, ``source[i] -> (image, label)``
with ``image`` uint8 [H, W, 3] RGB and ``label`` an int in ``[0, source.num_classes)``.
:class:`pfc_jax.data.loader.Loader` turns a source into this process's share of
seeded, shuffled global batches with a resumable position.
"""
