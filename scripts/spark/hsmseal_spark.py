"""hsmseal as a stage of a PySpark job: each partition piped through one
`hsmseal columns encrypt|decrypt` process (README "Running on Spark").

    from hsmseal_spark import hsmseal_stage
    sc.addPyFile("hsmseal_spark.py")           # ships this file to the executors
    stats = sc.accumulator([], ListParam())
    enc = lines.mapPartitions(hsmseal_stage(
        ["hsmseal", "--json", "--jobs", "1", "columns", "encrypt", "-f", "jsonl",
         "-k", "pii", "-c", "email,ssn", "--row-id", "id", "--context", "lake.users"],
        stats))

Invariants (why this and not `RDD.pipe`):
- The PIN never travels with the job. The child inherits the executor's own
  environment (HSMSEAL_PIN or HSMSEAL_PIN_FILE, set on each executor host by
  whoever starts it). PySpark's `RDD.pipe(cmd, env)` instead *replaces* the
  child's environment with `env`, a dict pickled into every task's closure:
  the PIN would have to ride in the closure. The argv holds no secret, and
  `hsmseal_stage` refuses one that has a `--pin` flag.
- A failed hsmseal fails the task. `RDD.pipe` has `checkCode=False` by
  default, which turns a hsmseal that stopped at row 500,000 (its abort
  marker lines included) into a silently "successful" partition. Here any
  non-zero exit raises, with hsmseal's own one-line error (its `--json`
  `error` line) as the message, so Spark's task failure says what broke and
  where; Spark then retries the task or fails the job, and its output
  committer discards the failed attempt's output.
- The `--json` summary of every successful partition (rows, cells, batches,
  HSM calls, seconds) is added to an accumulator. Spark merges user
  accumulators from successful tasks only, so a retried partition counts once.
- One process per partition: its own PKCS#11 session and login, no state
  shared with other tasks (the token itself serialises what it must). The
  output of a partition depends only on its input rows and fresh random salts,
  so a retried partition gives different, equally valid tokens.
- An empty partition starts no process (no HSM login for nothing).
"""

import json
import os
import signal
import subprocess
import threading

from pyspark import AccumulatorParam, TaskContext


class ListParam(AccumulatorParam):
    """Accumulator of per-partition summaries (a list of dicts)."""

    def zero(self, value):
        return []

    def addInPlace(self, a, b):
        return a + b


class HsmsealStageError(RuntimeError):
    pass


def _task_ids():
    ctx = TaskContext.get()
    if ctx is None:  # called outside Spark (tests of the function itself)
        return -1, 0
    return ctx.partitionId(), ctx.attemptNumber()


def hsmseal_stage(argv, stats=None, kill_after=None):
    """A function for `RDD.mapPartitions`: pipes the partition's lines (str,
    one record each, without newline) through `argv` and yields its output
    lines. `argv` must include `--json` (the summary and the error line are
    read from stderr). `kill_after=(partition, n)` is a fault injection for
    the end-to-end test: the first attempt of that partition SIGKILLs hsmseal
    after n output lines, as a lost executor would."""
    argv = list(argv)
    if "--json" not in argv:
        raise ValueError("hsmseal_stage: argv needs --json (summary and errors are read from it)")
    if any(a == "--pin" or a.startswith("--pin=") for a in argv):
        raise ValueError("hsmseal_stage: no PIN on the command line; set HSMSEAL_PIN or HSMSEAL_PIN_FILE on the executors")

    def run(lines):
        lines = iter(lines)
        first = next(lines, None)
        if first is None:
            return
        partition, attempt = _task_ids()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=os.environ.copy())
        feed_error = []

        def feed():
            # Writes the partition into hsmseal; a hsmseal that stopped early
            # closes the pipe, which ends the feeding (its exit code says why).
            try:
                buf = []
                size = 0
                for line in _chain(first, lines):
                    b = line.encode("utf-8") + b"\n"
                    buf.append(b)
                    size += len(b)
                    if size >= 1 << 16:
                        proc.stdin.write(b"".join(buf))
                        buf, size = [], 0
                if buf:
                    proc.stdin.write(b"".join(buf))
            except BrokenPipeError:
                pass
            except BaseException as e:  # the upstream iterator failed: stop hsmseal
                feed_error.append(e)
                proc.kill()
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass

        err_lines = []

        def drain_stderr():
            for raw in proc.stderr:
                err_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

        feeder = threading.Thread(target=feed, daemon=True)
        drainer = threading.Thread(target=drain_stderr, daemon=True)
        feeder.start()
        drainer.start()
        n = 0
        finished = False
        try:
            for raw in proc.stdout:
                yield raw.decode("utf-8").rstrip("\n")
                n += 1
                if kill_after and kill_after[0] == partition and attempt == 0 and n == kill_after[1]:
                    proc.send_signal(signal.SIGKILL)
                    break
            else:
                finished = True
        finally:
            # Also when the consumer stops early (the task is being killed):
            # hsmseal must not outlive its task.
            if not finished:
                proc.kill()
            rc = proc.wait()
            feeder.join()
            drainer.join()
        if feed_error:
            raise feed_error[0]
        summary, error = None, None
        for line in err_lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("type") == "summary":
                summary = obj
            elif obj.get("type") == "error":
                error = obj.get("message")
        if rc != 0:
            why = error or (f"killed by signal {-rc}" if rc < 0 else "; ".join(err_lines[-3:]) or "no message")
            raise HsmsealStageError(f"hsmseal exited {rc} in partition {partition} (attempt {attempt}): {why}")
        if summary is None:
            raise HsmsealStageError(f"hsmseal gave no --json summary in partition {partition}")
        if stats is not None:
            summary["partition"] = partition
            summary["attempt"] = attempt
            stats.add([summary])

    return run


def _chain(first, rest):
    yield first
    yield from rest
