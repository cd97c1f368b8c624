# Sourced by the netd bench scripts: the pieces of the netd config files they
# write. Each prints TOML on stdout.

# netd_config CONTROL STATE_DIR MODE MTU: the control socket, the state directory
# and the head of the one network, "bench" (more keys and its ports follow).
netd_config() {
  printf 'control = "%s"\nstate_dir = "%s"\n[[network]]\nname = "bench"\nmode = "%s"\nmtu = %s\n' \
    "$1" "$2" "$3" "$4"
}

# tap_port IFNAME NETNS [NAME]: a tap port whose kernel side netd creates in NETNS.
tap_port() {
  echo '[[network.port]]'
  [ -z "${3:-}" ] || echo "name = \"$3\""
  printf 'kind = "tap"\nifname = "%s"\nnetns = "%s"\n' "$1" "$2"
}
