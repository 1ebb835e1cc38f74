# Sourced by scripts/spark-e2e.sh and scripts/bench-spark.sh: makes Java and
# PySpark available, idempotently.
#
# spark_setup: a Java 17+ runtime (OpenJDK headless from Debian if none is on
# PATH; needs root or sudo) and PySpark from PyPI in a venv under
# ${SPARK_E2E_CACHE:-REPO/.cache}/spark-venv, reused when it already holds
# PySpark $SPARK_E2E_PYSPARK (default 4.0.1: Spark 4 runs on Java 17 and
# 21, both in Debian 12/13). Sets PY (the venv's python), exports
# PYSPARK_PYTHON (executors run the same python) and SPARK_LOCAL_IP, and
# SPARK_SETUP_NOTE (what was installed, for the log).

spark_setup() {
    local root cache venv want have pkg sudo="" note=()
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    cache=${SPARK_E2E_CACHE:-$root/.cache}
    venv=$cache/spark-venv
    want=${SPARK_E2E_PYSPARK:-4.0.1}
    [[ $(id -u) -eq 0 ]] || sudo=sudo

    if ! java_major_ok; then
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get update -qq >/dev/null
        # The first OpenJDK headless runtime this Debian has, 17 or newer.
        for pkg in openjdk-17-jre-headless openjdk-21-jre-headless openjdk-25-jre-headless; do
            if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then break; fi
            pkg=""
        done
        [[ -n $pkg ]] || { echo "spark-setup: no openjdk-17/21/25-jre-headless package in this Debian" >&2; return 2; }
        $sudo apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
        note+=("installed $pkg")
        java_major_ok || { echo "spark-setup: $pkg installed but no java 17+ on PATH" >&2; return 2; }
    fi
    JAVA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")
    export JAVA_HOME

    have=$("$venv/bin/python" -c 'import pyspark; print(pyspark.__version__)' 2>/dev/null || true)
    if [[ $have != "$want" ]]; then
        rm -rf "$venv"
        mkdir -p "$cache"
        if ! python3 -m venv "$venv" 2>/dev/null; then
            rm -rf "$venv"
            "$root/scripts/install-deps.sh" python3-venv
            python3 -m venv "$venv"
        fi
        # Without pip's cache: the ~300 MB wheel would be stored twice.
        PIP_NO_CACHE_DIR=1 "$venv/bin/pip" install -q --disable-pip-version-check "pyspark==$want"
        note+=("installed PySpark $want into $venv")
    else
        note+=("PySpark $want from $venv")
    fi
    PY=$venv/bin/python
    export PYSPARK_PYTHON=$PY PYSPARK_DRIVER_PYTHON=$PY
    # Spark resolves the host name to pick its address; loopback only here.
    export SPARK_LOCAL_IP=127.0.0.1
    SPARK_SETUP_NOTE="java $(java_major), ${note[*]}"
}

java_major() {
    java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}'
}

java_major_ok() {
    command -v java >/dev/null 2>&1 && [[ $(java_major) -ge 17 ]]
}
