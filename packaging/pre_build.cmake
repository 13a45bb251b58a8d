# CPack runs this after staging the files and before it builds the .deb: Debian wants manual
# pages and the changelog compressed with `gzip -9n` (no name, no timestamp, so the package is
# reproducible). Done here rather than in install() rules, so that a plain `cmake --install`
# tree keeps plain pages, and so that pages installed by other parts of the build (molt(1))
# get the same treatment without knowing about packaging.
find_program(MOLT_GZIP gzip REQUIRED)
file(GLOB_RECURSE molt_pages LIST_DIRECTORIES false
     "${CPACK_TEMPORARY_DIRECTORY}/usr/share/man/*")
file(GLOB_RECURSE molt_changelogs LIST_DIRECTORIES false
     "${CPACK_TEMPORARY_DIRECTORY}/usr/share/doc/*/changelog")
foreach(file IN LISTS molt_pages molt_changelogs)
  if(NOT file MATCHES "\\.gz$")
    execute_process(COMMAND "${MOLT_GZIP}" -9nf "${file}" COMMAND_ERROR_IS_FATAL ANY)
  endif()
endforeach()
