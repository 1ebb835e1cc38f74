"""A PySpark job that runs `hsmseal columns encrypt|decrypt` (or the
no-crypto `passthrough`, for the benchmark) over a JSON Lines dataset, one
hsmseal process per partition (hsmseal_spark.py), in Spark local mode.

    python job.py encrypt|decrypt|passthrough INPUT OUTPUT_DIR --stats FILE
        [--master local[2,2]] [--partitions 4] [--reshuffle] [--kill-after P:N]
        [--hsmseal PATH] [--key pii] [--columns name,email,ssn] [--row-id id]
        [--context spark.e2e.users] [--batch-size 10000]

Used by scripts/spark-e2e.sh and scripts/bench-spark.sh. The PIN comes from
the environment the executors inherit (HSMSEAL_PIN or HSMSEAL_PIN_FILE);
nothing secret is passed here. Exits non-zero if the job fails; on success
writes OUTPUT_DIR/part-* (Spark's layout, with _SUCCESS) and, to --stats,
one JSON object: the job's wall time and each partition's hsmseal summary.

`--reshuffle` moves every row to partition (id * 7919) mod P before the
stage: rows that were neighbours (one partition of the encrypt job) are
spread over all partitions, so decrypting after it shows the tokens do not
depend on which partition, or which process, made them.
`--kill-after P:N` SIGKILLs the first attempt of partition P after N output
rows (a lost executor); Spark retries the task (the master must allow
retries: local[2,2] = 2 cores, 2 attempts per task).
"""

import argparse
import json
import os
import re
import sys
import time

from pyspark import SparkConf, SparkContext

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hsmseal_spark import ListParam, hsmseal_stage  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["encrypt", "decrypt", "passthrough"])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--stats", required=True)
    ap.add_argument("--master", default="local[2,2]")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--reshuffle", action="store_true")
    ap.add_argument("--kill-after", default=None)
    ap.add_argument("--hsmseal", default="hsmseal")
    ap.add_argument("--key", default="pii")
    ap.add_argument("--columns", default="name,email,ssn")
    ap.add_argument("--row-id", default="id")
    ap.add_argument("--context", default="spark.e2e.users")
    ap.add_argument("--batch-size", default="10000")
    ap.add_argument("--local-dir", default=None)
    args = ap.parse_args()

    conf = (SparkConf().setMaster(args.master).setAppName(f"hsmseal-{args.action}")
            .set("spark.ui.enabled", "false")
            .set("spark.driver.bindAddress", "127.0.0.1")
            .set("spark.driver.host", "127.0.0.1")
            .set("spark.ui.showConsoleProgress", "false")
            # One hsmseal per task, one task per core: hsmseal runs --jobs 1.
            .set("spark.task.cpus", "1"))
    if args.local_dir:
        conf.set("spark.local.dir", args.local_dir)
    sc = SparkContext(conf=conf)
    sc.setLogLevel("ERROR")
    # How a cluster job ships the module to its executors.
    sc.addPyFile(os.path.join(HERE, "hsmseal_spark.py"))

    # --jobs 1: Spark supplies the parallelism (a task per core); more
    # threads per hsmseal would only contend for the task's one core.
    argv = [args.hsmseal, "--json", "--jobs", "1", "columns", args.action, "-f", "jsonl",
            "-c", args.columns, "--row-id", args.row_id]
    if args.action != "passthrough":
        argv += ["--context", args.context]
    if args.action == "encrypt":
        argv += ["-k", args.key, "--batch-size", args.batch_size]
    kill_after = None
    if args.kill_after:
        p, n = args.kill_after.split(":")
        kill_after = (int(p), int(n))

    lines = sc.textFile(args.input, minPartitions=args.partitions)
    if lines.getNumPartitions() > args.partitions:
        lines = lines.coalesce(args.partitions)
    elif lines.getNumPartitions() < args.partitions:
        lines = lines.repartition(args.partitions)
    if args.reshuffle:
        row_id = args.row_id
        n = args.partitions
        lines = (lines.map(lambda line: (int(json.loads(line)[row_id]), line))
                 .partitionBy(n, lambda k: (k * 7919) % n)
                 .values())

    stats = sc.accumulator([], ListParam())
    out = lines.mapPartitions(hsmseal_stage(argv, stats, kill_after))
    t0 = time.monotonic()
    rc = 0
    try:
        out.saveAsTextFile(args.output)
    except Exception as e:  # the job failed: say why in one line, exit non-zero
        # The Python traceback of the failed task is inside Py4J's message;
        # its last line names the exception and hsmseal's own error.
        msg = str(e)
        cause = re.findall(r"HsmsealStageError: (.*)", msg)
        print(f"job: {args.action} failed: {cause[-1].strip() if cause else msg.splitlines()[0]}", file=sys.stderr)
        rc = 1
    wall = time.monotonic() - t0
    if rc == 0:
        with open(args.stats, "w") as f:
            json.dump({"action": args.action, "master": args.master, "partitions": args.partitions,
                       "wall_seconds": wall, "summaries": stats.value}, f)
    sc.stop()
    sys.exit(rc)


if __name__ == "__main__":
    main()
