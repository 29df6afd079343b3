"""Run DPPMG or any RecBole model under the plugin's protocol.

python run_dppmg.py -d ml-100k-mm -m DPPMG
python run_dppmg.py -d ml-100k -m BPR,LightGCN,NGCF --epochs=100
python run_dppmg.py --stage prepare -d ml-100k-mm
"""

import sys

from recbole_dppmg.cli import main

if __name__ == "__main__":
    sys.exit(main())
