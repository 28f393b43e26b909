"""Data: sources, the grain pipeline, and dataset tools.

* :mod:`pfc_jax.data.sources`: random-access sources (synthetic, insightface RecordIO,
  image folder, TFDS ArrayRecord) behind one interface;
* :mod:`pfc_jax.data.pipeline`: seeded, sharded, augmented, resumable batches;
* ``python -m pfc_jax.data.prepare``: build a TFDS dataset from RecordIO or a folder;
* ``python -m pfc_jax.data.synth``: write synthetic identities as a RecordIO dataset
  with verification pairs;
* ``python -m pfc_jax.data.recordio index|check DIR``: rebuild or check an index.

Modules here import no JAX, so data-loader worker processes start fast.
"""
