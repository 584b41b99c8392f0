from stethoscope.cli import main

raise SystemExit(main())
