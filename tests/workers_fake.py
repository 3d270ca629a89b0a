"""A source that decoding workers can open without tfds, and a child program for signal tests.

``FakeSource``'s image ``k`` is a pure function of (seed, epoch, id), like a real
augmentation, so any worker decodes it alike. ``die_at`` / ``hang_at``: a worker that
reaches that id exits at once / sleeps forever (the failures the iterator must report).

Run as a program (``python workers_fake.py``), it starts 2 workers, prints one JSON line
(its pid, the workers' pids, the shared memory name) and reads batches until stopped.
"""

import json
import os
import sys
import time

import numpy as np


class FakeSource:
    num_classes = 7
    image_shape = (2, 2, 3)
    pixel_mean = (0.0,) * 3
    pixel_std = (1.0,) * 3

    def __init__(self, num_examples=40, die_at=-1, hang_at=-1, fail_in_worker=False,
                 in_worker=False):
        if fail_in_worker and in_worker:
            raise FileNotFoundError("no data set here")
        self.num_examples, self.die_at, self.hang_at = num_examples, die_at, hang_at
        self.fail_in_worker = fail_in_worker
        self.bad = []

    def worker_opener(self):
        return FakeSource, dict(num_examples=self.num_examples, die_at=self.die_at,
                                hang_at=self.hang_at, fail_in_worker=self.fail_in_worker,
                                in_worker=True)

    @staticmethod
    def image(i, seed, epoch):
        return np.full((2, 2, 3), (i * 7 + seed * 3 + epoch * 11) % 256, np.uint8)

    def decode_into(self, ids, *, seed, epoch, train, images, labels, map_fn=None):
        def one(i):
            if i == self.die_at:
                os._exit(3)
            if i == self.hang_at:
                time.sleep(3600)
            return self.image(i, seed, epoch)

        for k, out in enumerate((map_fn or map)(one, [int(i) for i in ids])):
            images[k], labels[k] = out, int(ids[k]) % 7

    def get_batch(self, ids, *, seed, epoch, train):
        images = np.empty((len(ids), *self.image_shape), np.uint8)
        labels = np.empty(len(ids), np.int32)
        self.decode_into(ids, seed=seed, epoch=epoch, train=train, images=images, labels=labels)
        return {"image": images, "label": labels}

    def note_bad(self, i, name, error, shard=None):
        self.bad.append((i, name, error, shard))

    def report_bad_to(self, report):
        self.note_bad = report

    def close(self):
        pass


class AllocatingSource(FakeSource):
    """Each image allocates and frees what a JPEG decode does (three 600 KB buffers live
    at once) and its label is the minor page faults that took: the memory cost of the
    worker's allocator settings, counted, not timed."""

    def worker_opener(self):
        return AllocatingSource, dict(num_examples=self.num_examples, in_worker=True)

    def decode_into(self, ids, *, seed, epoch, train, images, labels, map_fn=None):
        import resource

        def one(i):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            buffers = [np.ones(600_000, np.uint8) for _ in range(3)]
            del buffers
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        for k, faults in enumerate((map_fn or map)(one, [int(i) for i in ids])):
            images[k], labels[k] = self.image(int(ids[k]), seed, epoch), faults


def main():
    import faulthandler
    import signal

    from lsgd_jax.data.workers import WorkerTrainIterator

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks where it hangs

    it = WorkerTrainIterator(FakeSource(), decode_workers=2, global_batch_size=4, seed=0)
    next(it)
    print(json.dumps({"pid": os.getpid(), "workers": it.pids, "shm": it._shm.name}), flush=True)
    while True:
        next(it)
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
