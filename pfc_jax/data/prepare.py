"""Converts a face dataset into a TFDS ArrayRecord dataset (no TensorFlow needed).

    python -m pfc_jax.data.prepare --source rec:/data/ms1m-retinaface-t1 --name ms1mv3 --data-dir /data/tfds
    python -m pfc_jax.data.prepare --source folder:/data/my_faces --name my_faces --data-dir /data/tfds

Train on the result with ``--config.data.source=tfds --config.data.path=/data/tfds
--config.data.tfds_name=ms1mv3``. An interrupted build leaves nothing that loads.
"""

from __future__ import annotations

from pfc_jax import cli
from pfc_jax.data.recordio import RecordIODataset
from pfc_jax.data.sources import ImageFolder, SourceError, import_tfds


def open_source(spec: str):
    kind, _, path = spec.partition(":")
    if kind == "rec" and path:
        return RecordIODataset(path)
    if kind == "folder" and path:
        return ImageFolder(path)
    raise SourceError(f"--source {spec!r} is not a source (give rec:DIR or folder:DIR)")


def _parser():
    p = cli.parser("pfc_jax.data.prepare", __doc__)
    p.add_argument("--source", required=True, help="rec:DIR (insightface RecordIO) or folder:DIR")
    p.add_argument("--name", required=True, help="dataset name, lower_snake_case")
    p.add_argument("--data-dir", required=True, help="TFDS data directory to write into")
    return p


def _prepare(args) -> None:
    source = open_source(args.source)
    import_tfds()
    from pfc_jax.data import tfds_builder

    path = tfds_builder.build(source, args.name, args.data_dir)
    print(f"built {path}: {len(source)} images, {source.num_classes} classes")


def main(argv=None) -> None:
    cli.run(_prepare, _parser(), argv)


if __name__ == "__main__":
    main()
