"""The comparison app: chat with the original and compressed models side by side, race their throughput, browse
the run reports. Also the entry point of the Hugging Face Space (README front matter: ``app_file: app.py``).

    python app.py                       # runs/ (or $LLMCOMPRESS_RUNS_DIR); builds the default recipes if empty
    python app.py --runs runs --run smollm2-gptq4 --backends hf,vllm --port 7860
    gradio app.py -- --runs runs        # reload mode: edits to the UI code rebuild `demo`; the models stay loaded
    python app.py --help

Only parses arguments and launches: everything else is in llmcompress/ui/.
"""

import sys

from llmcompress.ui.launch import demo_of, reloading, serve, start

if __name__ == "__main__":  # vLLM spawns workers that re-import this file as __mp_main__: they start nothing
    if not reloading():  # the slow part (recipes built, models loaded) runs once; a reload keeps `started`
        started = start(sys.argv[1:])
        if isinstance(started, int):
            sys.exit(started)
    demo = demo_of(started)  # module-level `demo`: what `gradio app.py` reload mode looks for
    if not reloading():
        sys.exit(serve(demo, started))
