package main

import (
	"context"
	"fmt"
	"strings"
)

func init() {
	commands["completion"] = command{args: "bash|zsh|fish", run: cmdCompletion}
}

// completed are the commands the completion scripts offer, with the
// description zsh and fish show. The list is fixed so that the scripts do
// not depend on which files the binary was built with; the tests check
// that it has every command.
var completed = []struct{ name, desc string }{
	{"set", "set a user limit"},
	{"remove-limit", "remove a user limit"},
	{"devices", "list or limit a user devices"},
	{"speed", "cap a user speed"},
	{"throttle", "slow a user at the limit instead of blocking"},
	{"usage", "show a user usage"},
	{"list", "list users"},
	{"blocked", "list blocked and disabled users"},
	{"reset", "zero a user usage, or every user usage"},
	{"disable", "block a user until enabled"},
	{"enable", "lift disable"},
	{"unblock", "let a blocked user back in"},
	{"history", "daily usage"},
	{"status", "the agent health"},
	{"check", "run a check now"},
	{"version", "print the bwctl version"},
	{"menu", "interactive menu of the commands"},
	{"monitor", "live view of every user rate and usage"},
	{"completion", "print a shell completion script"},
	{"help", "list the commands"},
}

// Argument kinds of the completion scripts.
const (
	statuses   = "active warning blocked unlimited disabled"
	protocols  = "ssh vmess vless trojan shadowsocks"
	userCmds   = "set remove-limit devices usage reset disable enable unblock history"
	shells     = "bash zsh fish"
	listUsers  = `bwctl list 2>/dev/null | awk 'NR > 1 { print $1 }'`
	valueFlags = "-o|--socket|-socket|--status|-status|--protocol|-protocol|--for|-for|--from|-from|--to|-to"
)

func cmdCompletion(_ context.Context, e *env) error {
	if err := e.want(1, 1); err != nil {
		return usagef("%v: give the shell, bash, zsh or fish", err)
	}
	var script string
	switch e.args[0] {
	case "bash":
		script = bashCompletion()
	case "zsh":
		script = zshCompletion()
	case "fish":
		script = fishCompletion()
	default:
		return usagef("unknown shell %q: want bash, zsh or fish", e.args[0])
	}
	_, err := fmt.Fprint(e.out, script)
	return err
}

func commandNames() string {
	names := make([]string, len(completed))
	for i, c := range completed {
		names[i] = c.name
	}
	return strings.Join(names, " ")
}

func bashCompletion() string {
	return `# bash completion for bwctl.
# Install: bwctl completion bash > /etc/bash_completion.d/bwctl
# or add to ~/.bashrc: source <(bwctl completion bash)

# _bwctl_users prints the user names bwagent knows: the first column of
# bwctl list, without its header.
_bwctl_users() {
    if [ -n "$1" ]; then
        bwctl --socket "$1" list 2>/dev/null | awk 'NR > 1 { print $1 }'
    else
        ` + listUsers + `
    fi
}

_bwctl() {
    local cur prev cmd="" socket="" npos=0 i=1 w
    cur=${COMP_WORDS[COMP_CWORD]}
    prev=${COMP_WORDS[COMP_CWORD-1]}
    COMPREPLY=()

    # The command is the first word that is neither a flag nor a flag's
    # value; npos counts the arguments after it.
    while [ "$i" -lt "$COMP_CWORD" ]; do
        w=${COMP_WORDS[i]}
        case $w in
            --socket|-socket)
                socket=${COMP_WORDS[i+1]}
                i=$((i + 2))
                continue
                ;;
            ` + valueFlags + `)
                i=$((i + 2))
                continue
                ;;
            -*) ;;
            *)
                if [ -z "$cmd" ]; then
                    cmd=$w
                else
                    npos=$((npos + 1))
                fi
                ;;
        esac
        i=$((i + 1))
    done

    case $prev in
        -o)
            COMPREPLY=($(compgen -W "table json" -- "$cur"))
            return
            ;;
        --socket|-socket)
            COMPREPLY=($(compgen -f -- "$cur"))
            return
            ;;
        --status|-status)
            COMPREPLY=($(compgen -W "` + statuses + `" -- "$cur"))
            return
            ;;
        --protocol|-protocol)
            COMPREPLY=($(compgen -W "` + protocols + `" -- "$cur"))
            return
            ;;
        --for|-for|--from|-from|--to|-to)
            return
            ;;
    esac

    if [[ $cur == -* ]]; then
        local flags="-o --socket --bytes --help"
        case $cmd in
            set) flags="$flags --protocol" ;;
            list) flags="$flags --status" ;;
            reset) flags="$flags --all" ;;
            unblock) flags="$flags --for" ;;
            history) flags="$flags --from --to" ;;
        esac
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return
    fi

    case $cmd in
        "")
            COMPREPLY=($(compgen -W "` + commandNames() + `" -- "$cur"))
            ;;
        ` + strings.ReplaceAll(userCmds, " ", "|") + `)
            if [ "$npos" -eq 0 ]; then
                COMPREPLY=($(compgen -W "$(_bwctl_users "$socket")" -- "$cur"))
            elif [ "$cmd" = set ] && [ "$npos" -eq 1 ]; then
                COMPREPLY=($(compgen -W "unlimited" -- "$cur"))
            elif [ "$cmd" = devices ] && [ "$npos" -eq 1 ]; then
                COMPREPLY=($(compgen -W "off unlimited" -- "$cur"))
            fi
            ;;
        completion)
            if [ "$npos" -eq 0 ]; then
                COMPREPLY=($(compgen -W "` + shells + `" -- "$cur"))
            fi
            ;;
    esac
}

complete -F _bwctl bwctl
`
}

func zshCompletion() string {
	var cmds strings.Builder
	for _, c := range completed {
		fmt.Fprintf(&cmds, "    '%s:%s'\n", c.name, c.desc)
	}
	return `#compdef bwctl
# zsh completion for bwctl.
# Install: bwctl completion zsh > "${fpath[1]}/_bwctl"
# or add to ~/.zshrc: source <(bwctl completion zsh)

# _bwctl_users offers the user names bwagent knows: the first column of
# bwctl list, without its header.
_bwctl_users() {
  local -a users
  users=(${(f)"$(` + listUsers + `)"})
  compadd -a users
}

_bwctl() {
  local curcontext="$curcontext" state line ret=1
  local -a global cmds
  global=(
    '-o[output format]:format:(table json)'
    '--socket[control socket]:path:_files'
    '--bytes[print byte counts instead of KiB..TiB]'
  )
  cmds=(
` + cmds.String() + `  )

  _arguments -C $global '1:command:->command' '*::arg:->args' && ret=0
  case $state in
    command)
      _describe -t commands 'bwctl command' cmds && ret=0
      ;;
    args)
      case $words[1] in
        set)
          _arguments $global '--protocol[only if the user connects with this protocol]:protocol:(` + protocols + `)' '1:user:_bwctl_users' '2:limit (MiB, 500M, 10G, 1.5T):(unlimited)' && ret=0
          ;;
        list)
          _arguments $global '--status[only users with this status]:status:(` + statuses + `)' && ret=0
          ;;
        reset)
          _arguments $global '--all[reset every user]' '1:user:_bwctl_users' && ret=0
          ;;
        unblock)
          _arguments $global '--for[unblock for a duration (1h, 2d)]:duration: ' '1:user:_bwctl_users' && ret=0
          ;;
        history)
          _arguments $global '--from[first day]:day (YYYY-MM-DD): ' '--to[last day]:day (YYYY-MM-DD): ' '1:user:_bwctl_users' && ret=0
          ;;
        devices)
          _arguments $global '1:user:_bwctl_users' '2:devices (1 to 1000):(off unlimited)' && ret=0
          ;;
        remove-limit|usage|disable|enable)
          _arguments $global '1:user:_bwctl_users' && ret=0
          ;;
        completion)
          _arguments '1:shell:(` + shells + `)' && ret=0
          ;;
        *)
          _arguments $global && ret=0
          ;;
      esac
      ;;
  esac
  return ret
}

if [ "$funcstack[1]" = "_bwctl" ]; then
  _bwctl "$@"
else
  compdef _bwctl bwctl
fi
`
}

func fishCompletion() string {
	var b strings.Builder
	b.WriteString(`# fish completion for bwctl.
# Install: bwctl completion fish > ~/.config/fish/completions/bwctl.fish

# __bwctl_users prints the user names bwagent knows: the first column of
# bwctl list, without its header.
function __bwctl_users
    ` + listUsers + `
end

complete -c bwctl -f
complete -c bwctl -s o -x -a 'table json' -d 'output format'
complete -c bwctl -l socket -r -F -d 'control socket'
complete -c bwctl -l bytes -d 'print byte counts instead of KiB..TiB'
`)
	for _, c := range completed {
		fmt.Fprintf(&b, "complete -c bwctl -n 'not __fish_seen_subcommand_from %s' -a %s -d '%s'\n", commandNames(), c.name, c.desc)
	}
	b.WriteString(`complete -c bwctl -n '__fish_seen_subcommand_from set' -l protocol -x -a '` + protocols + `' -d 'only if the user connects with this protocol'
complete -c bwctl -n '__fish_seen_subcommand_from list' -l status -x -a '` + statuses + `' -d 'only users with this status'
complete -c bwctl -n '__fish_seen_subcommand_from reset' -l all -d 'reset every user'
complete -c bwctl -n '__fish_seen_subcommand_from unblock' -l for -x -d 'unblock for a duration (1h, 2d)'
complete -c bwctl -n '__fish_seen_subcommand_from history' -l from -x -d 'first day (YYYY-MM-DD)'
complete -c bwctl -n '__fish_seen_subcommand_from history' -l to -x -d 'last day (YYYY-MM-DD)'
complete -c bwctl -n '__fish_seen_subcommand_from ` + userCmds + `' -a '(__bwctl_users)' -d user
complete -c bwctl -n '__fish_seen_subcommand_from completion' -a '` + shells + `'
`)
	return b.String()
}
