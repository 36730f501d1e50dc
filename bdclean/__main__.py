from bdclean.cli import main

main()
