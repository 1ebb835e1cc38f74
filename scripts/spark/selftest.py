"""Self-test of hsmseal_spark.hsmseal_stage outside Spark (no JVM), run first
by scripts/spark-e2e.sh: the stage's own guarantees, each with a stand-in
child process so that each can fail on its own.

    python selftest.py HSMSEAL
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hsmseal_spark import HsmsealStageError, ListParam, hsmseal_stage  # noqa: E402


class Acc:
    def __init__(self):
        self.value = ListParam().zero(None)

    def add(self, v):
        self.value = ListParam().addInPlace(self.value, v)


def sh(script):
    return ["sh", "-c", script, "sh", "--json"]


def expect_raise(what, fn, needle):
    try:
        fn()
    except (HsmsealStageError, ValueError) as e:
        if needle not in str(e):
            sys.exit(f"selftest: FAIL: {what}: raised {e!r}, expected {needle!r}")
        return
    sys.exit(f"selftest: FAIL: {what}: did not raise")


def main():
    summary = '{"type":"summary","rows":2,"cells":2,"batches":1,"hsm_calls":1}'
    # A child that copies its input and reports a summary: lines pass through, stats counted.
    acc = Acc()
    out = list(hsmseal_stage(sh(f"cat; echo '{summary}' >&2"), acc)(iter(["a", "b"])))
    if out != ["a", "b"] or len(acc.value) != 1 or acc.value[0]["hsm_calls"] != 1:
        sys.exit(f"selftest: FAIL: pass-through gave {out!r}, stats {acc.value!r}")
    # An empty partition starts no process (this child would fail if started).
    if list(hsmseal_stage(sh("exit 9"), acc)(iter([]))) != [] or len(acc.value) != 1:
        sys.exit("selftest: FAIL: empty partition")
    # A child that fails after printing rows and an abort marker: the task fails with its error.
    fail = sh("""head -n 1; echo 'hsmseal: aborted'; echo '{"type":"error","message":"row 2: token authentication failed"}' >&2; exit 3""")
    expect_raise("failing child", lambda: list(hsmseal_stage(fail, acc)(iter(["x", "y", "z"] * 10000))),
                 "hsmseal exited 3 in partition -1 (attempt 0): row 2: token authentication failed")
    # Exit 0 without a summary is not success either.
    expect_raise("no summary", lambda: list(hsmseal_stage(sh("cat"), acc)(iter(["x"]))), "no --json summary")
    if len(acc.value) != 1:
        sys.exit("selftest: FAIL: a failed partition was counted")
    # No PIN on argv, and --json is required.
    expect_raise("--pin", lambda: hsmseal_stage(["hsmseal", "--json", "--pin", "1234"]), "no PIN on the command line")
    expect_raise("no --json", lambda: hsmseal_stage(["hsmseal", "columns"]), "needs --json")
    # The real binary: the PIN comes from the inherited environment.
    hs = sys.argv[1]
    argv = [hs, "--json", "--jobs", "1", "columns", "encrypt", "-f", "jsonl", "-k", "pii", "-c", "ssn",
            "--row-id", "id", "--context", "selftest"]
    out = list(hsmseal_stage(argv, acc)(iter(['{"id":1,"ssn":"123-45-6789"}'])))
    if len(out) != 1 or "hsc" not in out[0] or "123-45-6789" in out[0] or acc.value[-1]["hsm_calls"] != 1:
        sys.exit(f"selftest: FAIL: real hsmseal gave {out!r}")
    print("selftest: hsmseal_stage: pass-through, stats, empty partition, failing child, missing summary, "
          "--pin refused, real hsmseal: ok")


if __name__ == "__main__":
    main()
