"""The converter's inputs, one module per kind of source: an ImageFolder tree or a flat folder
with a label file (folder.py, labels.py), a tar or zip read in place (archive.py, with
tarheaders.py), a compressed tar read in order (stream.py), Hugging Face parquet shards
(parquet.py), WebDataset tar shards (webdataset.py), any map-style Python dataset (dataset.py).
listing.py picks the kind (patterns.py expands what --from-archive names) and gives the
converter and ``verify --source`` one Listing: the tree the source would extract to (classes,
files in the source's order, labels), whatever it is. Its paths are file paths or refs.Ref
objects, the one interface a new kind of source implements."""
