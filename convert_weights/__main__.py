import sys

from convert_weights.convert import main

sys.exit(main())
