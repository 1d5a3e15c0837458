from sa_export.cli import main

main()
