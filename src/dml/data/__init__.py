"""The datasets ``dml`` reads, as uint8 image tensors, and the batches made of them.

dataset.py holds the types every loader returns (``ImageData``, ``ImageSplit``) and the seeded
subsets taken of them; cifar.py reads CIFAR-100 / CIFAR-10's official files, with download.py
(download, checksum, extraction) and safe_pickle.py (an unpickler that only builds arrays);
folder.py reads folders of images; source.py picks the loader for a dataset name; augment.py and
batches.py turn the tensors into normalised, augmented batches.
"""
