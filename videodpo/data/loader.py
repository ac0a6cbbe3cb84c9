"""The training loader: pairs read ahead by worker processes, resumable bit for bit.

`PairSampler` is a `torch.utils.data.Sampler` over an endless shuffled order (a new
`randperm` per epoch, seeded by (seed, epoch)); each data-parallel rank takes every
R-th index. Its state is a position in that stream, `(epoch, position)`.

`PairLoader` wraps a plain `torch.utils.data.DataLoader` (`num_workers` processes,
`prefetch_factor` rows each read ahead, `batch_size=None`: one row per request) over
the sampler, so decoding and resizing overlap the training step. The main process
pulls rows one at a time, counts those it consumed, skips bad ones and fills a batch;
its `state_dict()` is the sampler's position advanced by the consumed rows (rows that
workers fetched ahead are not consumed), so a resumed run reads exactly what an
uninterrupted one reads, with or without workers. Bad rows come back from the workers
as reasons (`videodpo.data.dataset.read_row`) and are counted once, in the main
process, by one `BadRows`, capped by `data.max_bad_row_fraction`. This is what
torchdata's `StatefulDataLoader` offers, built from torch alone.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import UserError
from videodpo.config import MAX_BAD_ROW_FRACTION
from videodpo.data.dataset import BadRows, read_row


class PairSampler(Sampler[int]):
    """Endless shuffled indices for data rank `rank` of `replicas`, from a saved position.

    Iterating starts at the current `(epoch, position)` and does not move the sampler;
    `advance(n)` moves it past `n` consumed indices.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, replicas: int = 1) -> None:
        if size < replicas:
            raise UserError(f"{size} training pairs cannot be split over {replicas} data-parallel ranks")
        self.size, self.seed, self.rank, self.replicas = size, seed, rank, replicas
        self.epoch, self.position = 0, 0

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        usable = len(order) - len(order) % self.replicas
        return order[self.rank:usable:self.replicas]

    @property
    def epoch_length(self) -> int:
        return self.size // self.replicas

    def __iter__(self) -> Iterator[int]:
        return self._stream(self.epoch, self.position)

    def _stream(self, epoch: int, position: int) -> Iterator[int]:
        while True:
            yield from self.epoch_order(epoch)[position:]
            epoch, position = epoch + 1, 0

    def advance(self, consumed: int) -> None:
        total = self.position + consumed
        self.epoch += total // self.epoch_length
        self.position = total % self.epoch_length

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class _RowReader(Dataset):
    """What a worker runs: one row (passed through `transform`), or why it is bad."""

    def __init__(self, dataset: Dataset, transform: Callable[[dict], dict] | None = None) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[dict | None, tuple[int, str] | None]:
        item, bad = read_row(self.dataset, index)
        if item is not None and self.transform is not None:
            item = self.transform(item)
        return item, bad


def _as_read(row: Any) -> Any:
    return row


class PairLoader:
    """Full batches from a map-style pair dataset through a prefetching `DataLoader`.

    `collate(items)` turns a list of good items into what `next_batch` returns (the
    trainer encodes raw clips there, on the training device). `transform(item)` runs on
    each row where it is read, in the workers (the trainer encodes there when the
    encoders run on the CPU, so encoding overlaps the step too). `num_workers=0` reads
    in this process; the batches are the same either way.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        sampler: PairSampler,
        collate: Callable[[list[dict]], Any],
        max_bad_fraction: float = MAX_BAD_ROW_FRACTION,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.dataset, self.batch_size, self.sampler, self.collate = dataset, batch_size, sampler, collate
        self.transform = transform
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        own = getattr(dataset, "bad", None)
        self.bad = own if isinstance(own, BadRows) else BadRows("training data", len(dataset), max_bad_fraction)
        self._rows: Iterator | None = None
        self._consumed = 0  # rows taken from `_rows` since the sampler's position

    @property
    def skipped_rows(self) -> int:
        return self.bad.count

    def _open(self) -> Iterator:
        workers = self.num_workers
        # fork: workers share the dataset and the encoders copy-on-write; spawn would
        # pickle them (and cannot pickle a model FSDP has wrapped)
        context = "fork" if workers and "fork" in multiprocessing.get_all_start_methods() else None
        loader = DataLoader(
            _RowReader(self.dataset, self.transform), batch_size=None, sampler=self.sampler, collate_fn=_as_read,
            num_workers=workers, prefetch_factor=self.prefetch_factor if workers else None,
            multiprocessing_context=context,
            # its own generator: opening the loader leaves the global RNG alone
            generator=torch.Generator().manual_seed(self.sampler.seed),
        )
        return iter(loader)

    def next_batch(self) -> Any:
        items: list[dict] = []
        while len(items) < self.batch_size:
            if self._rows is None:
                self._rows = self._open()
            item, bad = next(self._rows)
            self._consumed += 1
            if bad is not None:
                self.bad.mark(*bad)  # raises a DataError past data.max_bad_row_fraction
                continue
            items.append(item)
        return self.collate(items)

    def state_dict(self) -> dict[str, Any]:
        position = PairSampler(self.sampler.size, self.sampler.seed, self.sampler.rank, self.sampler.replicas)
        position.load_state_dict(self.sampler.state_dict())
        position.advance(self._consumed)
        return {**position.state_dict(), "bad_rows": dict(self.bad.reasons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self.bad.reasons.clear()
        self.bad.reasons.update({int(k): v for k, v in state.get("bad_rows", {}).items()})

    def close(self) -> None:
        """Stop the worker processes; the next batch reopens from the consumed position."""
        if self._rows is not None:
            self.sampler.advance(self._consumed)
            self._rows, self._consumed = None, 0
