"""Jobs: one lifecycle for every kind, the queue and its wake-ups (stored files and the
upload spool: coordinator.files).

lifecycle.py        Lifecycle: queue, lease, extend, finish, requeue, fail, cancel, reap
image.py            ImageJobs (store.image_jobs), ImageJob: parameters, progress, results
text.py             TextJobs (store.text_jobs), TextJob: models, peers, streamed text
queue.py            queue order over the database, positions, ETAs
hot.py              the statements of the hot path (pop, lease, finish), built once
network.py          Network (store.network): who serves what, the queues
signals.py          in-process wake-ups for long-polls and streams
notify.py           the same across coordinator processes (PostgreSQL LISTEN/NOTIFY)
png_check.py        an upload is a valid PNG of the job's size
foreign_images.py   AI Horde workers' images (WebP/PNG) checked and re-encoded
source_check.py     requesters' source images and masks (base64) checked before queueing
previews.py         live previews of running image jobs (in memory, while watched)
possible.py         workers' offers: could any online worker serve a job (is_possible)
"""

__all__: list[str] = []
