"""The comparison app: chat with the original and compressed models side by side, race their throughput, browse
the run reports. Also the entry point of the Hugging Face Space (README front matter: ``app_file: app.py``).

    python app.py                       # runs/ (or $LLMCOMPRESS_RUNS_DIR); builds the default recipes if empty
    python app.py --runs runs --run smollm2-gptq4 --backends hf,vllm --port 7860
    python app.py --help

Only parses arguments and launches: everything else is in llmcompress/ui/.
"""

import sys

from llmcompress.ui.launch import main

if __name__ == "__main__":  # vLLM spawns workers that re-import the main module: start nothing on import
    sys.exit(main(sys.argv[1:]))
