"""Shards as users download them, written from an ImageFolder tree (in ImageFolder's order):
parquet files in the Hugging Face ``datasets`` layout (pyarrow) and WebDataset tars (tarfile).
"""

import io
import json
import os
import tarfile

from fastlmdb.sources import folder


def tree_items(split_dir):
    """[(bytes, label, file name)] of a tree split in ImageFolder's order, and its classes."""
    found = folder.list_tree(split_dir)
    items = []
    for path, label in zip(found.paths, found.labels.tolist()):
        with open(path, "rb") as file:
            items.append((file.read(), label, os.path.basename(path)))
    return items, found.classes


def hf_metadata(classes, image="image", label="label"):
    """The ``huggingface`` schema metadata datasets writes (Image + ClassLabel features)."""
    features = {image: {"_type": "Image"}}
    if classes is not None:
        features[label] = {"names": list(classes), "_type": "ClassLabel"}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_parquet(items, path, *, classes=None, rows_per_group=5, image="image",
                  label="label", label_type=None):
    """One parquet file of `items` [(bytes or None, label, path)], image as struct<bytes,
    path>, label int64 (or `label_type`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": data, "path": name} for data, _, name in items], type=struct)
    labels = pa.array([lab for _, lab, _ in items], type=label_type or pa.int64())
    table = pa.table({image: images, label: labels})
    table = table.replace_schema_metadata(hf_metadata(classes, image, label))
    # Image bytes PLAIN-encoded, as in the hub's shards (unique images overflow a dictionary
    # page at once); a dictionary would fold a benchmark's replicated images into one copy.
    pq.write_table(table, path, row_group_size=rows_per_group, use_dictionary=[label])
    return path


def parquet_from_tree(split_dir, out_dir, *, files=2, rows_per_group=5):
    """The tree's split as `files` parquet shards train-0000k-of-0000n.parquet; their paths."""
    items, classes = tree_items(split_dir)
    os.makedirs(out_dir, exist_ok=True)
    per = -(-len(items) // files)
    return [write_parquet(items[k * per:(k + 1) * per],
                          os.path.join(out_dir, f"train-{k:05d}-of-{files:05d}.parquet"),
                          classes=classes, rows_per_group=rows_per_group)
            for k in range(files)]


def write_wds(samples, path, *, compression=None, label_first=False):
    """One WebDataset shard of `samples` [(key, {ext: bytes})]; `label_first` puts each key's
    .cls before its image (members of a key in any order)."""
    mode = "w:gz" if compression == "gz" else "w"
    with tarfile.open(path, mode) as tar:
        for key, parts in samples:
            exts = sorted(parts, reverse=label_first)
            for ext in exts:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(parts[ext])
                tar.addfile(info, io.BytesIO(parts[ext]))
    return path


def wds_from_tree(split_dir, out_dir, *, shards=2, compression=None, label_first=False):
    """The tree's split as WebDataset shards (keys in ImageFolder's order); their paths."""
    items, _ = tree_items(split_dir)
    samples = []
    for i, (data, label, name) in enumerate(items):
        ext = name.rsplit(".", 1)[1].lower()
        samples.append((f"s{i:06d}", {ext: data, "cls": b"%d" % label,
                                      "json": json.dumps({"filename": name}).encode()}))
    os.makedirs(out_dir, exist_ok=True)
    per = -(-len(samples) // shards)
    suffix = ".tar.gz" if compression == "gz" else ".tar"
    return [write_wds(samples[k * per:(k + 1) * per],
                      os.path.join(out_dir, f"shard-{k:04d}{suffix}"),
                      compression=compression, label_first=label_first)
            for k in range(shards)]
