# bash completion for molt(1). Installed as share/bash-completion/completions/molt.
# The flag lists mirror `molt SUBCOMMAND --help`; tests/docs/test_cli_docs.py checks that
# every flag the parser defines is here.

_molt() {
    local cur prev words cword
    _init_completion -n = || return

    local commands="run check ctl version config-reference"
    local ctl_commands="status reload rollback history scale stop"
    local run_flags="-c --config --reload --listen --interface --python --control -b --bind
        -w --workers --threads -k --worker-class --chdir -e --env --timeout --graceful-timeout
        --keep-alive --max-requests --max-requests-jitter --access-logfile --error-logfile
        --log-file --log-level --pid --user --group --preload -D --daemon --worker-connections
        --access-logformat -h --help"
    local check_flags="-c --config --offline -h --help"
    local ctl_flags="-c --config --socket -h --help"

    # The subcommand (and ctl's command), skipping option values.
    local i command="" ctl_command=""
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            -c | --config | --socket | --timeout | --listen | --interface | --python | --control | \
                -b | --bind | -w | --workers | --threads | -k | --worker-class | --chdir | -e | \
                --env | --graceful-timeout | --keep-alive | --max-requests | \
                --max-requests-jitter | --access-logfile | --error-logfile | --log-file | \
                --log-level | --pid | --user | --group | --worker-connections | --access-logformat)
                ((i++))
                ;;
            -*) ;;
            *)
                if [[ -z $command ]]; then
                    command=${words[i]}
                elif [[ $command == ctl && -z $ctl_command ]]; then
                    ctl_command=${words[i]}
                fi
                ;;
        esac
    done

    case $prev in
        -c | --config)
            _filedir '@(yaml|yml)'
            return
            ;;
        --socket | --control | --python | --pid | --error-logfile | --log-file)
            _filedir
            return
            ;;
        --chdir)
            _filedir -d
            return
            ;;
        --interface)
            COMPREPLY=($(compgen -W "wsgi asgi" -- "$cur"))
            return
            ;;
        -k | --worker-class)
            COMPREPLY=($(compgen -W "sync gthread uvicorn.workers.UvicornWorker" -- "$cur"))
            return
            ;;
        --log-level)
            COMPREPLY=($(compgen -W "debug info warning error" -- "$cur"))
            return
            ;;
        --access-logfile)
            COMPREPLY=($(compgen -W "-" -f -- "$cur"))
            return
            ;;
        --user)
            COMPREPLY=($(compgen -u -- "$cur"))
            return
            ;;
        --group)
            COMPREPLY=($(compgen -g -- "$cur"))
            return
            ;;
        --timeout | --listen | -b | --bind | -w | --workers | --threads | -e | --env | \
            --graceful-timeout | --keep-alive | --max-requests | --max-requests-jitter | \
            --worker-connections | --access-logformat)
            return
            ;;
    esac

    case $command in
        "")
            COMPREPLY=($(compgen -W "$commands -h --help -V --version" -- "$cur"))
            ;;
        run)
            COMPREPLY=($(compgen -W "$run_flags" -- "$cur"))
            ;;
        check)
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W "$check_flags" -- "$cur"))
            else
                _filedir '@(yaml|yml)'
            fi
            ;;
        ctl)
            case $ctl_command in
                "") COMPREPLY=($(compgen -W "$ctl_commands $ctl_flags" -- "$cur")) ;;
                status | history | scale) COMPREPLY=($(compgen -W "--json $ctl_flags" -- "$cur")) ;;
                reload | rollback)
                    COMPREPLY=($(compgen -W "--wait --timeout --json $ctl_flags" -- "$cur"))
                    ;;
                stop) COMPREPLY=($(compgen -W "--fast --json $ctl_flags" -- "$cur")) ;;
            esac
            ;;
        *)
            COMPREPLY=($(compgen -W "-h --help" -- "$cur"))
            ;;
    esac
} && complete -F _molt molt
