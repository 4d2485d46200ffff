"""fastlmdb.loader: a DataLoader whose dataset knows its batch size."""

from __future__ import annotations

from typing import Any

import torch.utils.data


def loader(dataset: torch.utils.data.Dataset[Any], *, batch_size: int,
           loader_class: type[torch.utils.data.DataLoader[Any]] = torch.utils.data.DataLoader,
           **options: Any) -> torch.utils.data.DataLoader[Any]:
    """``loader_class(dataset, batch_size=batch_size, **options)``, having told `dataset` the
    batch size when it takes one (``set_batch_size``, as LMDBIterDataset does: its workers
    then take turns by whole batches and ``len(loader)`` is what they yield).

    `loader_class` is any DataLoader-like class, torchdata's StatefulDataLoader for one."""
    set_batch_size = getattr(dataset, "set_batch_size", None)
    if set_batch_size is not None:
        given = getattr(dataset, "batch_size", None)
        if given is not None and given != batch_size:
            raise ValueError(f"batch_size={given} was given to {type(dataset).__name__}, but "
                             f"the loader has batch_size={batch_size}: give both the same")
        set_batch_size(batch_size)
    return loader_class(dataset, batch_size=batch_size, **options)
