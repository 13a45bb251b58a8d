# Runs at install time (`cmake --install`, and CPack when it stages the Debian package), when
# the real prefix is known: `--prefix` may differ from the one given at configure time. So the
# files that name installed paths are generated here, with configure_file, for every prefix.
#
# Set by the install(CODE) rule before this script: MOLT_SOURCE_DIR, MOLT_STAGING_DIR, and
# MOLT_EXAMPLE_SUBDIR (where the demo app goes, relative to the prefix).
#
# The one layout rule: with the distribution prefix /usr, units go to /lib/systemd/system and
# the example config to /etc/molt (as GNUInstallDirs maps /usr to /etc); with any other prefix
# both stay inside it (<prefix>/lib/systemd/system, <prefix>/etc/molt), a relocatable tree.
if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  set(molt_unit_dir "/lib/systemd/system")
  set(molt_config_dir "/etc/molt")
else()
  set(molt_unit_dir "${CMAKE_INSTALL_PREFIX}/lib/systemd/system")
  set(molt_config_dir "${CMAKE_INSTALL_PREFIX}/etc/molt")
endif()

# Placeholders the templates use.
set(MOLT_BINARY "${CMAKE_INSTALL_PREFIX}/bin/molt")
set(MOLT_EXAMPLE_DIR "${CMAKE_INSTALL_PREFIX}/${MOLT_EXAMPLE_SUBDIR}")

file(GLOB molt_unit_templates "${MOLT_SOURCE_DIR}/systemd/*.in")
foreach(template IN LISTS molt_unit_templates)
  get_filename_component(unit "${template}" NAME_WLE)
  configure_file("${template}" "${MOLT_STAGING_DIR}/units/${unit}" @ONLY)
  file(INSTALL "${MOLT_STAGING_DIR}/units/${unit}" DESTINATION "${molt_unit_dir}"
       PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
endforeach()

configure_file("${MOLT_SOURCE_DIR}/packaging/example/molt.yaml.in"
               "${MOLT_STAGING_DIR}/molt.yaml" @ONLY)
file(INSTALL "${MOLT_STAGING_DIR}/molt.yaml" DESTINATION "${molt_config_dir}"
     PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)

# The container image's config, beside the demo app it runs (packaging/Dockerfile uses it).
configure_file("${MOLT_SOURCE_DIR}/packaging/example/container.yaml.in"
               "${MOLT_STAGING_DIR}/container.yaml" @ONLY)
file(INSTALL "${MOLT_STAGING_DIR}/container.yaml" DESTINATION "${MOLT_EXAMPLE_DIR}"
     PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
