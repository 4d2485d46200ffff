"""What does handing a uint8 batch from a DataLoader worker to the main process cost?

One process plays both sides (the CPU is the same, wherever it is spent): make a
64x3x224x224 uint8 batch tensor, write every byte (as decoding into it does), pickle it as a
worker's result queue does (torch's ForkingPickler), unpickle it as the main process does, let
go of it. Candidates: torch's way, a fresh shared-memory tensor per batch (what its collate
stacks into, and what a worker-made tensor is moved to); fastlmdb.handover's reused memfd
segments; and, as the floor, an ordinary tensor reused in one process (num_workers=0).

    .venv/bin/python bench/handover.py            # ~20 s
"""

import pickle
from multiprocessing.reduction import ForkingPickler

import harness

BATCH = (64, 3, 224, 224)


def main(argv=None):
    p = harness.parser(__doc__.split("\n")[0], repeats=5)
    p.add_argument("--batches", type=int, default=40, help="batches per run (default 40)")
    args = harness.parse(p, argv, quick_limit=1)
    if args.quick:
        args.batches = 4
    import torch
    import torch.utils.data

    from fastlmdb.loading import handover

    torch.set_num_threads(1)
    # This process stands in for a worker: handover only reuses segments inside one.
    torch.utils.data.get_worker_info = lambda: object()
    reused = torch.empty(BATCH, dtype=torch.uint8)

    def torch_shared():
        storage = torch.UntypedStorage._new_shared(reused.numel())
        return [torch.empty(0, dtype=torch.uint8).set_(storage, 0, BATCH), torch.zeros(64)]

    def segment():
        return handover.batch(handover.images(BATCH), torch.zeros(64, dtype=torch.int64))

    candidates = [
        harness.Candidate("torch: a fresh shared-memory tensor per batch",
                          _run(torch_shared, args.batches)),
        harness.Candidate("fastlmdb.handover: reused memfd segments", _run(segment, args.batches)),
        harness.Candidate("floor: one ordinary tensor, rewritten (no handover)",
                          _run(lambda: [reused], args.batches, send=False)),
    ]
    results = harness.measure(candidates, repeats=args.repeats, warmup=args.warmup)
    harness.report(harness.result_name(args, "handover"), results, baseline=candidates[0].label,
                   title="Handing a 64x3x224x224 uint8 batch from a worker to the main process",
                   info=harness.machine_info(),
                   notes=["images: 64 per batch; img/CPU-s counts writing every byte of the "
                          "batch plus handing it over (both sides, in one process)",
                          "In one process torch's receiving side finds the sender's mapping in "
                          "its cache; between two processes it maps and unmaps the segment "
                          "too, so the torch row is a little flattering."])


def _run(make, batches, send=True):
    def run():
        for _ in range(batches):
            sent = make()
            sent[0].fill_(7)  # every page written, as decoding into the batch does
            if send:
                received = pickle.loads(ForkingPickler.dumps(sent))
                del sent
                assert int(received[0][-1, -1, -1, -1]) == 7
                del received
        return batches * BATCH[0]
    return run


if __name__ == "__main__":
    main()
