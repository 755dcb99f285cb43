#!/usr/bin/env bash
# Llama 2 weights from the signed URL Meta e-mails after the licence is accepted, in Meta's layout
# (consolidated.NN.pth + params.json per model, tokenizer.model at the top), as Meta's own
# download.sh fetches them; but resumable, checked, and never printing the URL's signed part.
#
#   scripts/download.sh --url "$SIGNED_URL" --models 7B,7B-chat --dir ./llama-2
#   scripts/download.sh            # asks for the URL and the models, as Meta's script does
#   xllama generate --model ./llama-2/llama-2-7b "The capital of France is"
#
# The URL has a '*' where each file's path goes (https://.../*?Policy=...&Signature=...); it is
# valid for 24 hours. Run the script again after an interruption: finished files are kept and
# partial ones continue (wget --continue, or curl -C - when wget is absent). Every checklist.chk
# is checked with md5sum; a mismatch stops the script, naming the file.
set -euo pipefail

ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"

usage() {
    cat <<EOF
Usage: $(basename "$0") [--url URL] [--models LIST] [--dir DIR]

  --url URL      the signed URL from Meta's e-mail (asked for when not given)
  --models LIST  comma-separated, from ${ALL_MODELS} (asked for when not given; Enter: all)
  --dir DIR      where to put the files (default: the current folder)
EOF
}

fail() {  # fail CODE MESSAGE: one line on stderr, then exit
    echo "error: $2" >&2
    exit "$1"
}

URL="" MODELS="" DIR="." URL_GIVEN=0 MODELS_GIVEN=0
while (($#)); do
    case "$1" in
        --url) (($# >= 2)) || fail 2 "--url needs a value"; URL="$2"; URL_GIVEN=1; shift 2 ;;
        --url=*) URL="${1#*=}"; URL_GIVEN=1; shift ;;
        --models) (($# >= 2)) || fail 2 "--models needs a value"; MODELS="$2"; MODELS_GIVEN=1; shift 2 ;;
        --models=*) MODELS="${1#*=}"; MODELS_GIVEN=1; shift ;;
        --dir) (($# >= 2)) || fail 2 "--dir needs a value"; DIR="$2"; shift 2 ;;
        --dir=*) DIR="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; fail 2 "unknown argument '$1'" ;;
    esac
done

if ((!URL_GIVEN)); then
    # -s: the signed URL is a secret, so it is not echoed back either
    read -r -s -p "Enter the URL from email: " URL || true
    echo >&2
fi
if ((!MODELS_GIVEN)); then
    read -r -p "Enter the list of models to download without spaces (${ALL_MODELS}), or press Enter for all: " MODELS || true
fi
MODELS="${MODELS:-$ALL_MODELS}"

[[ "$URL" =~ ^https?:// ]] || fail 2 "the URL must start with https:// (copy it whole from Meta's e-mail)"
[[ "$URL" == *'*'* ]] || fail 2 "the URL has no '*' where the file names go; copy it whole from Meta's e-mail"

# model -> folder and number of model-parallel shards; all checked before anything is fetched
declare -a PATHS=() SHARDS=()
IFS=',' read -r -a WANTED <<<"$MODELS"
((${#WANTED[@]})) || fail 2 "no model given; choose from ${ALL_MODELS}"
for m in "${WANTED[@]}"; do
    case "$m" in
        7B) PATHS+=(llama-2-7b); SHARDS+=(1) ;;
        7B-chat) PATHS+=(llama-2-7b-chat); SHARDS+=(1) ;;
        13B) PATHS+=(llama-2-13b); SHARDS+=(2) ;;
        13B-chat) PATHS+=(llama-2-13b-chat); SHARDS+=(2) ;;
        70B) PATHS+=(llama-2-70b); SHARDS+=(8) ;;
        70B-chat) PATHS+=(llama-2-70b-chat); SHARDS+=(8) ;;
        *) fail 2 "unknown model '$m'; choose from ${ALL_MODELS}" ;;
    esac
done

if command -v wget >/dev/null 2>&1; then
    TOOL=wget
elif command -v curl >/dev/null 2>&1; then
    TOOL=curl
else
    fail 2 "neither wget nor curl is installed; install one of them"
fi
if command -v md5sum >/dev/null 2>&1; then
    MD5=md5sum
elif command -v md5 >/dev/null 2>&1; then
    MD5=md5  # macOS
else
    fail 2 "md5sum is not installed (coreutils); it checks the downloads"
fi

mkdir -p "$DIR"

# fetch PATH_IN_URL: download into DIR/PATH_IN_URL, continuing a partial file.
# The URL reaches wget/curl on stdin, not on the command line: it never shows in `ps` or in a message.
fetch() {
    local rel="$1" out="$DIR/$1" url rc=0 code
    url="${URL/'*'/$rel}"
    echo "Downloading ${rel}"
    if [[ $TOOL == wget ]]; then
        printf '%s\n' "$url" | wget --continue --quiet --show-progress -O "$out" -i - || rc=$?
    else
        url="${url//\\/\\\\}"
        code=$(printf 'url = "%s"\n' "${url//\"/\\\"}" |
            curl --fail --location --continue-at - --retry 3 --progress-bar --output "$out" \
                --write-out '%{http_code}' --config -) || rc=$?
        # 416 to a resumed request: nothing is left past what is on disk, the file is complete (the checksum decides)
        if ((rc != 0)) && [[ "${code:-}" == 416 && -s "$out" ]]; then
            rc=0
        fi
    fi
    if ((rc != 0)); then
        fail 1 "download of ${rel} failed (${TOOL} exit code ${rc}); if the server refused it, the signed URL may have expired (it lasts 24 hours: ask Meta for a new one); otherwise run the script again to continue"
    fi
}

# check FOLDER CHECKLIST: md5 of every file the checklist names
check() {
    local folder="$1" list="$2" out="" rc=0 bad
    if [[ $MD5 == md5sum ]]; then
        out=$(cd "$folder" && md5sum -c --quiet "$list" 2>&1) || rc=$?
    else
        out=$(cd "$folder" && while read -r sum name; do
            name="${name#\*}"
            [[ -f "$name" && "$(md5 -q "$name")" == "$sum" ]] || echo "${name}: FAILED"
        done <"$list")
        [[ -z "$out" ]] || rc=1
    fi
    if ((rc != 0)); then
        bad=$(printf '%s\n' "$out" | sed -n 's/: FAILED.*$//p' | sort -u | sed "s|^|${folder}/|" | paste -sd ' ' -)
        fail 1 "checksum mismatch: ${bad:-$folder/$list}; delete it and run the script again to fetch it anew"
    fi
    echo "Checksums match: ${folder}/${list}"
}

echo "Downloading LICENSE and Acceptable Usage Policy"
fetch LICENSE
fetch USE_POLICY.md

echo "Downloading tokenizer"
fetch tokenizer.model
fetch tokenizer_checklist.chk
check "$DIR" tokenizer_checklist.chk

for i in "${!PATHS[@]}"; do
    model="${PATHS[$i]}"
    echo "Downloading ${model}"
    mkdir -p "$DIR/$model"
    for ((s = 0; s < SHARDS[i]; s++)); do
        fetch "$(printf '%s/consolidated.%02d.pth' "$model" "$s")"
    done
    fetch "$model/params.json"
    fetch "$model/checklist.chk"
    check "$DIR/$model" checklist.chk
done

echo "Done. Run: xllama generate --model ${DIR%/}/${PATHS[0]} \"PROMPT\""
