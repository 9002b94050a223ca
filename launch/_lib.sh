# Shared by the launch/ scripts (sourced, not run): quoting, dry-run and usage errors.
# The caller sets USAGE (its usage text) and DRY_RUN (0 or 1) before using these.

# One shell word, quoted only where it needs to be (the rules of Python's shlex.quote), so a
# printed command can be pasted into a shell as it is.
quote() {
  if [[ -z $1 ]]; then
    printf "''"
  elif [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

# The words "$@" as one quoted command line (no newline).
quote_words() {
  local sep=""
  for w in "$@"; do
    printf '%s' "$sep"
    quote "$w"
    sep=" "
  done
}

# Runs the command "$@", or with DRY_RUN=1 prints it (one line, quoted) instead.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    quote_words "$@"
    echo
  else
    "$@"
  fi
}

# A bad command line: the message and the usage on stderr, exit status 2.
usage_error() {
  echo "$(basename "$0"): $*" >&2
  echo "$USAGE" >&2
  exit 2
}

# Exits 2 unless $2 (the value given to option $1) is non-empty and not another option.
need_value() {
  [[ -n ${2:-} && $2 != --* ]] || usage_error "$1 needs a value"
}
