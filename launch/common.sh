# shellcheck shell=bash
# Helpers the launchers source; not meant to be run. Builtins only: a launcher must reach its "not on PATH" check
# (and its --dry-run output) even where PATH holds nothing but its own tool.

PROG=${0##*/}

usage_error() {
    printf '%s: %s\n%s: run %s --help for usage\n' "$PROG" "$1" "$PROG" "$PROG" >&2
    exit 2
}

need_value() {
    # a forgotten value must not swallow the next option: `--tpu --dry-run` would otherwise run gcloud for real
    (($# >= 2)) && [[ $2 != -* ]] || usage_error "$1 needs a value"
}

check_int() {  # NAME VALUE MIN [MAX]
    # bounded digits and no leading zero: bash arithmetic would read 08 as bad octal or wrap a long number
    if ! [[ $2 =~ ^(0|[1-9][0-9]{0,8})$ ]] || (($2 < $3)) || { (($# >= 4)) && (($2 > $4)); }; then
        usage_error "$1 must be an integer >= $3${4:+ and <= $4}, not '$2'"
    fi
}

require() {  # FLAG VALUE
    [[ -n $2 ]] || usage_error "$1 is required"
}

require_tool() {  # TOOL WHAT-PROVIDES-IT
    command -v "$1" >/dev/null \
        || { printf '%s: %s is not on PATH; install %s, or use --dry-run to only print the command\n' \
                    "$PROG" "$1" "$2" >&2; exit 127; }
}

# One line that any POSIX shell, and Python's shlex, split back into exactly these words. Single quotes rather than
# printf %q: readable when printed, and %q's $'...' for control characters is bash-only and shlex cannot read it.
quote_words() {
    local line='' word prefix q="'\\''"
    for word; do
        prefix=''
        # --opt='a b' rather than '--opt=a b': the same word, easier to read
        if [[ $word =~ ^--[A-Za-z0-9-]+= ]]; then
            prefix=${BASH_REMATCH[0]}
            word=${word#"$prefix"}
        fi
        if [[ -n $word && $word != *[^A-Za-z0-9_./:=,@%+-]* ]]; then
            line+=" $prefix$word"
        else
            line+=" $prefix'${word//\'/$q}'"
        fi
    done
    printf '%s' "${line# }"
}

has_set_key() {  # KEY ARGS...: whether ARGS already carry --set KEY=...
    local key=$1 prev='' arg
    shift
    for arg; do
        [[ $arg == "--set=$key="* || ($prev == --set && $arg == "$key="*) ]] && return 0
        prev=$arg
    done
    return 1
}
