# Sourced by the drift scripts: starts the loopback simulator with the arguments given (after
# `llm simulate`), stops it when the script exits, and writes "$W/llm.toml" pointing at it.
#   start_sim [semtel global flags --] simulate flags…
start_sim() {
  local pre=()
  if [ "${1:-}" = "--model" ]; then pre=(--model "$2"); shift 2; fi
  $BIN "${pre[@]}" llm simulate "$@" > "$W/sim.log" 2>&1 &
  SIM=$!
  trap 'kill $SIM 2>/dev/null || true' EXIT
  # The confusable error model embeds the truth file first: allow two minutes.
  for _ in $(seq 600); do grep -q listening "$W/sim.log" && break; sleep 0.2; done
  local url
  url=$(awk '/listening/ {print $3}' "$W/sim.log")
  printf 'cache = "off"\n[[endpoints]]\nname = "sim"\nurl = "%s"\nmodel = "sim-1"\nmax_concurrency = 16\n' "$url" > "$W/llm.toml"
}
