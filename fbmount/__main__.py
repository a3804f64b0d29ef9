from fbmount.cli import main

raise SystemExit(main())
