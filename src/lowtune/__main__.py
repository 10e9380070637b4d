from lowtune.cli import main

main()
