# Source this on the lent GPU machine (device tool, `carry: [".whl"]`): it has no package registry, so the
# wheels attnc needs beyond the image (lark, platformdirs, rich, ...) travel in .whl/ (see README).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
