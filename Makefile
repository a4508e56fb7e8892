# CSP Designer — the front door. `make help` lists the targets.

CARGO ?= cargo
BUF_VERSION ?= 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: run
run: ## Build and start every service and the gateway on localhost:8080 (SQLite + in-process bus)
	$(CARGO) run --bin csp -- serve --target all

.PHONY: test
test: $(BUF) ## Run the whole test suite (PostgreSQL + Redis suites too when CSP_TEST_DATABASE_URL and CSP_TEST_REDIS_URL are set)
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

.PHONY: clean
clean: ## Remove build output, local tools and the embedded default's data
	$(CARGO) clean
	rm -rf $(TOOLS) data
