"""Data and checks for scripts/spark-e2e.sh (standard library only).

    check.py gen ROWS OUT.jsonl             the dataset: id, name, email, ssn
    check.py tokens PLAIN.jsonl ENC_DIR     every selected cell is a token, not its plaintext;
                                            NULL stays NULL; other fields and the row set unchanged
    check.py same PLAIN.jsonl OUT...        the lines (files or Spark output dirs) equal PLAIN's,
                                            byte for byte, as multisets sorted by id
    check.py stats ENC.json DEC.json BATCH  HSM calls: per partition, batches = ceil(cells / BATCH),
                                            one HSM call per batch; totals against rows / BATCH
    check.py tamper ENC_DIR OUT_DIR         a copy of ENC_DIR with one token changed (one base64
                                            character of its ciphertext), prints the row id
    check.py swap ENC_DIR OUT.jsonl         two rows with their ssn tokens swapped, and
    check.py pick ENC_DIR N OUT.jsonl       N rows, for the plain-CLI checks

Each check prints one line and exits 1 on any difference.
"""

import glob
import json
import math
import os
import random
import shutil
import sys

COLUMNS = ("name", "email", "ssn")
PREFIXES = ("hsc1.", "hsc2.")


def fail(msg):
    print(f"check: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def parts(path):
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "part-*")))
        if not files:
            fail(f"{path}: no part-* files")
        return files
    return [path]


def read_lines(paths):
    out = []
    for p in paths:
        for f in parts(p):
            with open(f, encoding="utf-8") as fh:
                out.extend(line.rstrip("\n") for line in fh)
    return out


def by_id(lines):
    return sorted(lines, key=lambda ln: json.loads(ln)["id"])


def gen(rows, out):
    # Awkward but valid values: quotes, backslashes, commas, non-ASCII,
    # control characters (written as \u00XX by json.dumps), empty strings,
    # NULLs, and a few non-string values (encrypted as their JSON text).
    rnd = random.Random(15)
    first = ["Anna", "Jean-Luc", "Zoë", 'Mary "Mae"', "李小龙", "O'Neil", "Ana María", "back\\slash", "tab\there"]
    last = ["Smith", "Dupont, Jr.", "Ångström", "García", "Nguyen", "Müller", "bell\x07"]
    with open(out, "w", encoding="utf-8") as f:
        buf = []
        for i in range(1, rows + 1):
            email = None if i % 13 == 0 else "" if i % 17 == 0 else f"user{i}@example.com"
            ssn = (None if i % 11 == 0 else i if i % 1000 == 7 else
                   f"{rnd.randrange(1000):03}-{rnd.randrange(100):02}-{rnd.randrange(10000):04}")
            row = {"id": i, "name": f"{rnd.choice(first)} {rnd.choice(last)}", "email": email, "ssn": ssn}
            buf.append(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            if len(buf) >= 10000:
                f.write("\n".join(buf) + "\n")
                buf = []
        if buf:
            f.write("\n".join(buf) + "\n")
    print(f"check: generated {rows} rows in {out}")


def tokens(plain_path, enc_dir):
    plain = {json.loads(ln)["id"]: json.loads(ln) for ln in read_lines([plain_path])}
    enc = read_lines([enc_dir])
    if len(enc) != len(plain):
        fail(f"{enc_dir}: {len(enc)} rows, input has {len(plain)}")
    seen = set()
    cells = 0
    for ln in enc:
        row = json.loads(ln)
        src = plain.pop(row["id"], None)
        if src is None:
            fail(f"{enc_dir}: row id {row['id']} is not in the input, or appears twice")
        if set(row) != set(src):
            fail(f"row {row['id']}: fields {sorted(row)} != {sorted(src)}")
        for k, v in row.items():
            if k not in COLUMNS:
                if v != src[k]:
                    fail(f"row {row['id']}: unselected field {k} changed")
            elif src[k] is None:
                if v is not None:
                    fail(f"row {row['id']}: NULL {k} became {v!r}")
            else:
                if not (isinstance(v, str) and v.startswith(PREFIXES)):
                    fail(f"row {row['id']}: {k} is not a token: {v!r}")
                if v == src[k]:
                    fail(f"row {row['id']}: {k} token equals its plaintext")
                if v in seen:
                    fail(f"row {row['id']}: {k} token repeats an earlier one")
                seen.add(v)
                cells += 1
    print(f"check: {len(enc)} rows, {cells} tokens: every selected non-NULL cell is a distinct token, "
          f"none equals its plaintext, NULLs and other fields unchanged")


def same(plain_path, outs):
    want = by_id(read_lines([plain_path]))
    got = by_id(read_lines(outs))
    if len(want) != len(got):
        fail(f"{' '.join(outs)}: {len(got)} rows, input has {len(want)}")
    for a, b in zip(want, got):
        if a != b:
            fail(f"round trip differs:\n  in:  {a}\n  out: {b}")
    print(f"check: round trip of {len(want)} rows equals the input byte for byte ({' '.join(outs)})")


def stats(enc_path, dec_path, batch):
    enc = json.load(open(enc_path))
    dec = json.load(open(dec_path))
    batch = int(batch)
    es, ds = enc["summaries"], dec["summaries"]
    for name, s in (("encrypt", es), ("decrypt", ds)):
        ids = sorted(x["partition"] for x in s)
        if ids != list(range(len(ids))) or len(ids) != enc["partitions"]:
            fail(f"{name}: partition summaries {ids}, expected one for each of {enc['partitions']}")
    rows = sum(x["rows"] for x in es)
    cells = sum(x["cells"] for x in es)
    batches = sum(x["batches"] for x in es)
    calls = sum(x["hsm_calls"] for x in es)
    for x in es:
        want = math.ceil(x["cells"] / batch)
        if x["batches"] != want or x["hsm_calls"] != x["batches"]:
            fail(f"encrypt partition {x['partition']}: {x['cells']} cells, {x['batches']} batches, "
                 f"{x['hsm_calls']} HSM calls; expected {want} of each")
    # Whatever the partitioning, at most one more batch per partition than
    # one process would make: HSM calls grow with batches, never with rows.
    if calls > math.ceil(cells / batch) + len(es):
        fail(f"encrypt: {calls} HSM calls for {cells} cells (> ceil(cells/{batch}) + partitions)")
    dcalls = sum(x["hsm_calls"] for x in ds)
    dcells = sum(x["cells"] for x in ds)
    if dcells != cells or sum(x["rows"] for x in ds) != rows:
        fail(f"decrypt saw {dcells} cells, encrypt made {cells}")
    # Decrypt: one HSM call per distinct batch a partition meets (batch keys
    # are cached by token header); after --reshuffle every partition meets
    # (nearly) every batch.
    for x in ds:
        if not 1 <= x["hsm_calls"] <= batches:
            fail(f"decrypt partition {x['partition']}: {x['hsm_calls']} HSM calls, {batches} batches exist")
    retried = [x["partition"] for x in es if x["attempt"] > 0]
    print(f"check: encrypt {rows} rows, {cells} cells in {len(es)} partitions: {batches} batches, "
          f"{calls} HSM calls (rows/batch = {rows / batch:.0f}, cells/batch = {cells / batch:.1f}; "
          f"{cells / calls:.0f} cells per HSM call); decrypt after reshuffle: {dcalls} HSM calls "
          f"(<= partitions x batches = {len(ds) * batches}); retried partitions: {retried or 'none'}")
    return retried


def tamper(enc_dir, out_dir):
    shutil.copytree(enc_dir, out_dir)
    os.remove(os.path.join(out_dir, "_SUCCESS"))
    # Hadoop's local file system keeps a CRC file beside each part and would
    # catch the change itself; someone who alters the data drops those (and
    # HDFS or S3 keep none the attacker cannot rewrite): hsmseal must catch it.
    for crc in glob.glob(os.path.join(out_dir, ".*.crc")):
        os.remove(crc)
    f = parts(out_dir)[len(parts(out_dir)) // 2]
    lines = open(f, encoding="utf-8").read().split("\n")
    i = len(lines) // 2
    while True:
        row = json.loads(lines[i])
        if isinstance(row["ssn"], str):
            break
        i += 1
    tok = row["ssn"]
    pos = len(tok) - 10  # inside the ciphertext / tag
    row["ssn"] = tok[:pos] + ("A" if tok[pos] != "A" else "B") + tok[pos + 1:]
    lines[i] = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
    with open(f, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    print(row["id"])


def pick(enc_dir, n, out):
    lines = read_lines([enc_dir])[: int(n)]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def swap(enc_dir, out):
    rows = [json.loads(ln) for ln in read_lines([enc_dir])[:50]]
    a, b = [r for r in rows if isinstance(r["ssn"], str)][:2]
    a["ssn"], b["ssn"] = b["ssn"], a["ssn"]
    with open(out, "w", encoding="utf-8") as f:
        for r in (a, b):
            f.write(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"gen": lambda: gen(int(args[0]), args[1]),
     "tokens": lambda: tokens(*args),
     "same": lambda: same(args[0], args[1:]),
     "stats": lambda: stats(*args),
     "tamper": lambda: tamper(*args),
     "pick": lambda: pick(*args),
     "swap": lambda: swap(*args)}[cmd]()
