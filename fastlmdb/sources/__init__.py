"""The converter's inputs, one module per kind of source: an ImageFolder tree or a flat folder
with a label file (folder.py, labels.py), a tar or zip read in place (archive.py, with
tarheaders.py), a compressed tar read in order (stream.py). listing.py picks the kind and
gives the converter and ``verify --source`` one Listing: the tree the source would extract to
(classes, files in ImageFolder's order, labels), whatever it is."""
